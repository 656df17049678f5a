"""The ``maskd`` command line.

Subcommands: ``train``, ``learn-masks``, ``distill``, ``evaluate``, ``visualize``, ``export``,
``data synth``, ``models``, ``demo``. Options come in groups (``--model.name``,
``--data.root``, ``--optim.lr``, ``--trainer.max_steps``, ``--run.out``, ...); every one can
be given in a YAML file (``--config``; its ``base:`` files merged in first, see
:mod:`maskd.config_files`) and overridden after it on the command line;
``--print_config`` shows the resolved configuration. Problems with the options or the
files they name end the command with one ``maskd: error: ...`` line and exit status 1
(2 for options that do not parse); ``MASKD_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Literal

from jsonargparse import ArgumentError, ArgumentParser, Namespace

from maskd.config_files import ConfigFileAction
from maskd.engine.config import DataArgs, ModelArgs
from maskd.engine.jobs import DistillArgs, MaskArgs, RunArgs
from maskd.engine.optim import OptimSpec
from maskd.engine.trainer import TrainerSpec
from maskd.errors import UserError, UserValueError

__all__ = ["build_parser", "main"]


def _parser(description: str) -> ArgumentParser:
    p = ArgumentParser(description=description, exit_on_error=False)
    p.add_argument(
        "--config",
        action=ConfigFileAction,
        help="YAML file with any of the options; its 'base:' files (paths relative to it) "
        "are merged in first",
    )
    return p


def _train_parser() -> ArgumentParser:
    p = _parser("Train a task model: a teacher, or a plain student as the baseline.")
    p.add_class_arguments(ModelArgs, "model")
    p.add_class_arguments(DataArgs, "data")
    p.add_class_arguments(OptimSpec, "optim")
    p.add_class_arguments(TrainerSpec, "trainer")
    p.add_class_arguments(RunArgs, "run")
    return p


def _learn_parser() -> ArgumentParser:
    p = _parser("Stage 1: learn receptive tokens on a frozen, trained teacher.")
    p.add_class_arguments(ModelArgs, "teacher")
    p.add_class_arguments(MaskArgs, "masks")
    p.add_class_arguments(DataArgs, "data")
    p.add_class_arguments(OptimSpec, "optim")
    p.add_class_arguments(TrainerSpec, "trainer")
    p.add_class_arguments(RunArgs, "run")
    p.set_defaults(
        {
            "optim.name": "adam",
            "optim.lr": 0.01,
            "optim.weight_decay": 1e-3,
            "optim.schedule": "cosine",
            "optim.min_lr": 1e-6,
        }
    )
    return p


def _distill_parser() -> ArgumentParser:
    p = _parser("Stage 2: distil a student from the teacher through the learned tokens.")
    p.add_class_arguments(ModelArgs, "student")
    p.add_class_arguments(ModelArgs, "teacher")
    p.add_class_arguments(DistillArgs, "distill")
    p.add_class_arguments(DataArgs, "data")
    p.add_class_arguments(OptimSpec, "optim")
    p.add_class_arguments(TrainerSpec, "trainer")
    p.add_class_arguments(RunArgs, "run")
    return p


def _evaluate_parser() -> ArgumentParser:
    p = _parser("Score a model on the validation split (COCO AP or mIoU).")
    p.add_class_arguments(ModelArgs, "model")
    p.add_class_arguments(DataArgs, "data")
    p.add_class_arguments(TrainerSpec, "trainer")
    p.add_argument("--out", type=str | None, default=None, help="write the metrics as JSON here")
    p.set_defaults({"trainer.progress_bar": False})
    return p


def _visualize_parser() -> ArgumentParser:
    p = _parser("Overlay each token's mask, per level, on images; write one PNG per image set.")
    p.add_class_arguments(ModelArgs, "teacher")
    p.add_argument("--tokens", type=str, required=True, help="token file (tokens.pt)")
    p.add_argument("--images", type=list[str], required=True, help="image files")
    p.add_argument("--size", type=int | None, default=None, help="resize images to size×size")
    p.add_argument(
        "--normalize",
        type=bool,
        default=False,
        help="ImageNet-normalise the images first (segmentation teachers)",
    )
    p.add_argument("--out", type=str, default="masks.png", help="output PNG")
    return p


def _export_parser() -> ArgumentParser:
    p = _parser("Export the trained (or distilled) model as a plain torchvision state dict.")
    p.add_argument(
        "--checkpoint",
        type=str,
        required=True,
        help="a Lightning checkpoint (.ckpt) from train or distill",
    )
    p.add_argument("--out", type=str, required=True, help="output .pt file")
    return p


def _synth_parser() -> ArgumentParser:
    p = _parser("Write a synthetic detection (COCO) or segmentation (folder) dataset.")
    p.add_argument("--out", type=str, required=True, help="output folder")
    p.add_argument("--task", type=Literal["detection", "segmentation"], default="detection")
    p.add_argument("--train", type=int, default=200, help="training images")
    p.add_argument("--val", type=int, default=50, help="validation images")
    p.add_argument("--test", type=int, default=0, help="test images (0: no test split)")
    p.add_argument(
        "--difficulty",
        type=Literal["hard", "easy", "clutter"],
        default="hard",
        help="hard: photos, clutter, 6 classes; easy: 3 classes on noise; clutter: easy "
        "plus object-sized distractors",
    )
    p.add_argument("--size", type=int, default=128, help="image side in pixels")
    p.add_argument(
        "--object_scale",
        type=float,
        default=1.0,
        help="easy/clutter: draw objects and distractors as in an image of side "
        "object_scale * size (0 < s <= 1, s * size >= 32); objects stay 1-3, so background "
        "grows",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", type=bool, default=False)
    p.add_argument("--preview", type=int, default=8, help="samples in preview.png (0: none)")
    return p


def _models_parser() -> ArgumentParser:
    p = ArgumentParser(description="List the registry's models.", exit_on_error=False)
    p.add_argument("--task", type=Literal["detection", "segmentation"] | None, default=None)
    p.add_argument("--num_classes", type=int | None, default=None)
    return p


def _demo_parser() -> ArgumentParser:
    p = _parser("Run the whole pipeline on synthetic data and write runs/demo/report.md.")
    p.add_argument("--task", type=Literal["detection", "segmentation"], default="detection")
    p.add_argument(
        "--out",
        type=str | None,
        default=None,
        help="output folder (default runs/demo, runs/demo-segmentation)",
    )
    p.add_argument("--fresh", type=bool, default=False, help="delete earlier results first")
    p.add_argument(
        "--configs",
        type=str | None,
        default=None,
        help="folder with the demo's stage configs (default: configs/demo/<task>)",
    )
    p.add_argument("--threads", type=int | None, default=None, help="torch CPU threads")
    return p


def build_parser() -> ArgumentParser:
    """The ``maskd`` parser with all subcommands."""
    parser = ArgumentParser(
        prog="maskd",
        description="MasKD: masked distillation with receptive tokens.",
        exit_on_error=False,
    )
    sub = parser.add_subcommands(dest="command", required=True)
    sub.add_subcommand("train", _train_parser(), help="train a teacher or a plain student")
    sub.add_subcommand("learn-masks", _learn_parser(), help="stage 1: learn receptive tokens")
    sub.add_subcommand("distill", _distill_parser(), help="stage 2: masked distillation")
    sub.add_subcommand("evaluate", _evaluate_parser(), help="score a model")
    sub.add_subcommand("visualize", _visualize_parser(), help="token masks over images → PNG")
    sub.add_subcommand("export", _export_parser(), help="plain state dict for torchvision")
    data = ArgumentParser(description="Dataset tools.", exit_on_error=False)
    sub.add_subcommand("data", data, help="dataset tools (data synth)")
    sub.add_subcommand("models", _models_parser(), help="list registry models")
    sub.add_subcommand("demo", _demo_parser(), help="end-to-end demo on synthetic data")
    data_sub = data.add_subcommands(dest="data_command", required=True)
    data_sub.add_subcommand("synth", _synth_parser(), help="write a synthetic dataset")
    return parser


# ---- commands -------------------------------------------------------------------------


def _print_metrics(metrics: dict[str, float]) -> None:
    for key in sorted(metrics):
        print(f"{key:24s} {metrics[key]:.4f}")


def _preflight(c: Namespace) -> None:
    """Cheap checks before anything is written: model names, weight files, data folder."""
    from maskd import models
    from maskd.engine.jobs import check_token_files

    for group in ("model", "teacher", "student"):
        args = getattr(c, group, None)
        if args is None:
            continue
        models.get_spec(args.name)
        for key in ("weights", "backbone_weights"):
            value = getattr(args, key)
            if value is not None and not Path(value).is_file():
                raise FileNotFoundError(f"{group}.{key}: no such file {value!r}")
    distill = getattr(c, "distill", None)
    if distill is not None:
        check_token_files(distill, models.task_of(c.student.name), c.student.name)
    data = getattr(c, "data", None)
    if data is not None and not Path(data.root).is_dir():
        raise FileNotFoundError(f"data.root: no such folder {data.root!r}")


def _save_config(parser: ArgumentParser, cfg: Namespace, out: str | Path) -> None:
    """Write the resolved options next to the results (``config.yaml``).

    A different ``config.yaml`` already there (an earlier attempt, a resume with other
    options) is kept as ``config.<n>.yaml`` with the first free ``n``, never overwritten.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    text = parser.dump(cfg)
    path = out / "config.yaml"
    if path.is_file() and path.read_text() != text:
        n = 1
        while (out / f"config.{n}.yaml").exists():
            n += 1
        path.replace(out / f"config.{n}.yaml")
    path.write_text(text)


def _cmd_train(parser: ArgumentParser, raw: Namespace, c: Namespace) -> int:
    from maskd.engine.jobs import run_train

    _preflight(c)
    save = partial(_save_config, parser, raw, c.run.out)  # once the run is accepted
    _print_metrics(run_train(c.model, c.data, c.optim, c.trainer, c.run, on_start=save))
    return 0


def _cmd_learn(parser: ArgumentParser, raw: Namespace, c: Namespace) -> int:
    from maskd.engine.jobs import run_learn_masks

    _preflight(c)
    save = partial(_save_config, parser, raw, c.run.out)  # once the run is accepted
    _print_metrics(
        run_learn_masks(c.teacher, c.masks, c.data, c.optim, c.trainer, c.run, on_start=save)
    )
    print(f"tokens: {Path(c.run.out) / 'tokens.pt'}")
    return 0


def _cmd_distill(parser: ArgumentParser, raw: Namespace, c: Namespace) -> int:
    from maskd.engine.jobs import run_distill

    _preflight(c)
    save = partial(_save_config, parser, raw, c.run.out)  # once the run is accepted
    _print_metrics(
        run_distill(
            c.student, c.teacher, c.distill, c.data, c.optim, c.trainer, c.run, on_start=save
        )
    )
    return 0


def _cmd_evaluate(parser: ArgumentParser, raw: Namespace, c: Namespace) -> int:
    from maskd.engine.jobs import run_evaluate

    _print_metrics(run_evaluate(c.model, c.data, c.trainer, c.out))
    return 0


def _cmd_visualize(parser: ArgumentParser, raw: Namespace, c: Namespace) -> int:
    from maskd.engine.jobs import build_model
    from maskd.token_io import load_tokens
    from maskd.visualize import (
        load_images,
        save_mask_png,
        summary_report,
        token_masks_and_summary,
    )

    tokens = load_tokens(c.tokens)
    if c.teacher.num_classes is None:
        raise UserValueError("teacher.num_classes is required (the class count the teacher has)")
    model, _, _ = build_model(c.teacher, c.teacher.num_classes)
    images = load_images(c.images, c.size)
    mean = std = None
    if c.normalize:
        from maskd.data import IMAGENET_MEAN, IMAGENET_STD

        mean, std = IMAGENET_MEAN, IMAGENET_STD
        images = [_normalise(img, mean, std) for img in images]
    masks, summary = token_masks_and_summary(model, tokens, images)
    path = save_mask_png(images, masks, c.out, mean, std, summary)
    print("each token's mean mask (coverage) and head weight over the images, per level:")
    for line in summary_report(summary):
        print(line)
    print(f"wrote {path}")
    return 0


def _normalise(img: Any, mean: Sequence[float], std: Sequence[float]) -> Any:
    import torch

    return (img - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def _cmd_export(parser: ArgumentParser, raw: Namespace, c: Namespace) -> int:
    from maskd.export import export_checkpoint

    path, info = export_checkpoint(c.checkpoint, c.out)
    print(f"wrote {path} ({info['model']}, {info['num_classes']} classes)")
    if info["torchvision"] is not None:
        print(f"load without maskd: {info['torchvision']}")
    else:
        print(f"no torchvision-only equivalent: {info['torchvision_gap']}")
    print(f"load with maskd: {info['maskd']}")
    return 0


def _cmd_data(parser: ArgumentParser, raw: Namespace, c: Namespace) -> int:
    from maskd.data import synth

    s = c.synth
    out = synth.generate(
        s.out,
        s.task,
        s.train,
        s.val,
        s.size,
        s.seed,
        overwrite=s.overwrite,
        test=s.test,
        difficulty=s.difficulty,
        object_scale=s.object_scale,
    )
    tail = f" and {s.test} test" if s.test else ""
    print(f"wrote {s.train} training, {s.val} validation{tail} images to {out}")
    if s.preview > 0 and s.val > 0:
        png = synth.preview(out, s.task, Path(out) / "preview.png", n=s.preview)
        print(f"preview: {png}")
    return 0


def _cmd_models(parser: ArgumentParser, raw: Namespace, c: Namespace) -> int:
    from maskd import models

    rows = models.describe(num_classes=c.num_classes, task=c.task)
    print(f"{'name':36s} {'task':13s} {'params':>8s}  default layers")
    for r in rows:
        print(
            f"{r.name:36s} {r.task:13s} {r.num_params / 1e6:7.1f}M  {', '.join(r.default_layers)}"
        )
    return 0


def _cmd_demo(parser: ArgumentParser, raw: Namespace, c: Namespace) -> int:
    from maskd.demo import run_demo

    report = run_demo(task=c.task, out=c.out, fresh=c.fresh, configs=c.configs, threads=c.threads)
    print(f"report: {report}")
    return 0


_COMMANDS: dict[str, Callable[[ArgumentParser, Namespace, Namespace], int]] = {
    "train": _cmd_train,
    "learn-masks": _cmd_learn,
    "distill": _cmd_distill,
    "evaluate": _cmd_evaluate,
    "visualize": _cmd_visualize,
    "export": _cmd_export,
    "data": _cmd_data,
    "models": _cmd_models,
    "demo": _cmd_demo,
}


def _one_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    if isinstance(err, KeyError) and len(err.args) == 1:
        text = str(err.args[0])
    parts = [line.strip() for line in text.splitlines() if line.strip()]
    line = parts[0] if parts else type(err).__name__
    for part in parts[1:]:  # "...model (FCOS):" + "shape mismatches" reads as one sentence
        line += (" " if line.endswith(":") else "; ") + part
    return line


def _quiet() -> None:
    """Keep Lightning's start-up chatter and third-party deprecation notes off the console."""
    import logging
    import warnings

    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.showwarning = show_warning
    os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")


def show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: Any = None,
    line: str | None = None,
) -> None:
    """A library's warning as one line (``maskd: warning: ...``), not Python's two-line form
    with the source line of the library that raised it."""
    text = " ".join(str(message).split())
    where = "/".join(part for part in (Path(filename).parent.name, Path(filename).name) if part)
    print(f"maskd: warning: {text} ({category.__name__}, {where}:{lineno})",
          file=sys.stderr if file is None else file)  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``maskd`` console script; returns the exit status."""
    _quiet()
    parser = build_parser()
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        parser.print_help()
        return 2
    try:
        cfg = parser.parse_args(args)
    except ArgumentError as err:
        print(f"maskd: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except UserError as err:  # a config file's 'base:' chain (maskd.config_files)
        if os.environ.get("MASKD_DEBUG"):
            raise
        print(f"maskd: error: {_one_line(err)}", file=sys.stderr)
        return 2
    command = cfg.command
    sub_parser = parser._subcommands_action._name_parser_map[command]
    raw = cfg[command]
    from maskd.engine.interrupt import Interrupted, SignalReceived, raise_on_signal

    handlers = {s: signal.signal(s, raise_on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        inst = sub_parser.instantiate(raw) if command not in ("data",) else raw
        return _COMMANDS[command](sub_parser, raw, inst)
    except Interrupted as err:
        print(f"maskd: {err}", file=sys.stderr)
        if err.checkpoint is not None:
            how = "again" if command == "demo" else "with --run.resume=auto"
            print(f"maskd: to continue, run the same command {how}", file=sys.stderr)
        return err.exit_code
    except (KeyboardInterrupt, SignalReceived) as err:
        signum = getattr(err, "signum", signal.SIGINT)
        print(f"maskd: stopped by {signal.Signals(signum).name}", file=sys.stderr)
        return 128 + signum
    except (UserError, OSError) as err:  # anything else is a bug: its traceback stays
        if os.environ.get("MASKD_DEBUG"):
            raise
        print(f"maskd: error: {_one_line(err)}", file=sys.stderr)
        return getattr(err, "exit_code", 1)
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


if __name__ == "__main__":
    raise SystemExit(main())
