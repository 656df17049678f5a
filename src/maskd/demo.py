"""``maskd demo``: the whole MasKD pipeline on a synthetic dataset, offline, on a CPU.

Stages (each skipped when its ``done.json`` exists; an interrupted stage resumes from its
last checkpoint, so a killed run re-run gives the same numbers as an uninterrupted one):

1. ``data``     write the synthetic dataset (``maskd.data.synth``);
2. ``teacher``  train the big model;
3. ``student``  train the small model alone (the baseline);
4. ``masks``    learn receptive tokens on the frozen teacher (stage 1);
5. ``distill``  train the small model again, same recipe, plus MasKD (stage 2);
6. ``evaluate`` score the three models on the validation split;
7. ``report``   ``report.md`` with a metrics table and a timings table, ``loss_curves.png``,
   ``token_masks.png``.

Stage settings come from ``configs/demo/<task>/`` (``demo.yaml`` for the dataset and one
YAML per stage, in the format of the matching ``maskd`` subcommand).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from maskd.errors import UserValueError

__all__ = ["default_configs", "run_demo"]

STAGES = ("data", "teacher", "student", "masks", "distill", "evaluate")


def default_configs(task: str) -> Path:
    """``configs/demo/<task>`` of the source tree (or of the current folder)."""
    candidates = [
        Path.cwd() / "configs" / "demo" / task,
        Path(__file__).resolve().parents[2] / "configs" / "demo" / task,
    ]
    for path in candidates:
        if path.is_dir():
            return path
    raise FileNotFoundError(f"demo configs not found; looked in {[str(c) for c in candidates]}")


class _Timings:
    """Per-stage wall-clock seconds, kept in ``timings.json`` across re-runs."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}

    def record(self, stage: str, seconds: float, resumed: bool) -> None:
        self.data[stage] = {"seconds": round(seconds, 1), "resumed": resumed}
        self.path.write_text(json.dumps(self.data, indent=2) + "\n")


def _stage_args(command: str, config: Path, overrides: Sequence[str]) -> Any:
    """Parse a stage config exactly as ``maskd <command> --config <config> ...`` would."""
    from maskd import cli

    parser = {
        "train": cli._train_parser,
        "learn-masks": cli._learn_parser,
        "distill": cli._distill_parser,
        "evaluate": cli._evaluate_parser,
    }[command]()
    if not config.is_file():
        raise FileNotFoundError(f"demo config not found: {config}")
    raw = parser.parse_args(["--config", str(config), *overrides])
    return parser, raw, parser.instantiate(raw)


def _log(message: str) -> None:
    print(f"[maskd demo] {message}", flush=True)


def run_demo(
    task: str = "detection",
    out: str | Path | None = None,
    fresh: bool = False,
    configs: str | Path | None = None,
    threads: int | None = None,
    extra: Sequence[str] = (),
) -> Path:
    """Run (or finish) the demo; returns the path of ``report.md``.

    Args:
        task: ``detection`` (COCO AP) or ``segmentation`` (mIoU).
        out: output folder (default ``runs/demo`` / ``runs/demo-segmentation``).
        fresh: delete ``out`` first instead of continuing it.
        configs: folder with ``demo.yaml`` and the stage configs.
        threads: ``torch.set_num_threads`` for the run.
        extra: options appended to every training stage (e.g. ``--trainer.progress_bar=false``).
    """
    import torch

    from maskd.data import synth
    from maskd.engine.jobs import run_distill, run_evaluate, run_learn_masks, run_train

    if task not in ("detection", "segmentation"):
        raise UserValueError(f"task must be 'detection' or 'segmentation', got {task!r}")
    if threads is not None:
        torch.set_num_threads(threads)
    out = (
        Path(out)
        if out is not None
        else Path("runs/demo" + ("" if task == "detection" else "-segmentation"))
    )
    cfg_dir = Path(configs) if configs is not None else default_configs(task)
    if fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    demo_cfg = yaml.safe_load((cfg_dir / "demo.yaml").read_text())
    timings = _Timings(out / "timings.json")
    total_start = time.perf_counter()

    # 1. data
    d = demo_cfg["data"]
    data_root = out / "data"
    meta = data_root / "synth_meta.json"
    if not meta.is_file():
        _log(
            f"writing the synthetic {task} dataset ({d['train']} train / {d['val']} val, {d['size']} px)"
        )
        start = time.perf_counter()
        if data_root.exists():
            shutil.rmtree(data_root)  # a half-written dataset from a killed run
        tmp = out / "data.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        synth.generate(
            tmp, task, d["train"], d["val"], d["size"], d.get("seed", 0),
            difficulty=d.get("difficulty", "hard"),
        )  # fmt: skip
        tmp.rename(data_root)
        timings.record("data", time.perf_counter() - start, False)

    common = [f"--data.root={data_root}", "--run.resume=auto", *extra]

    def stage(name: str, command: str, config: str, runner: Any, more: Sequence[str] = ()) -> None:
        run_dir = out / name
        if (run_dir / "done.json").is_file():
            _log(f"{name}: done earlier, skipped")
            return
        resumed = (run_dir / "checkpoints" / "last.ckpt").is_file()
        _log(f"{name}: {'resuming' if resumed else 'starting'} ({cfg_dir / config})")
        parser, raw, args = _stage_args(
            command, cfg_dir / config, [*common, f"--run.out={run_dir}", *more]
        )
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(parser.dump(raw))
        start = time.perf_counter()
        runner(args)
        timings.record(name, time.perf_counter() - start, resumed)

    stage(
        "teacher",
        "train",
        "teacher.yaml",
        lambda a: run_train(a.model, a.data, a.optim, a.trainer, a.run),
    )
    stage(
        "student",
        "train",
        "student.yaml",
        lambda a: run_train(a.model, a.data, a.optim, a.trainer, a.run),
    )
    teacher_weights = f"--teacher.weights={out / 'teacher' / 'model.pt'}"
    stage(
        "masks",
        "learn-masks",
        "learn_masks.yaml",
        lambda a: run_learn_masks(a.teacher, a.masks, a.data, a.optim, a.trainer, a.run),
        [teacher_weights],
    )
    stage(
        "distill",
        "distill",
        "distill.yaml",
        lambda a: run_distill(a.student, a.teacher, a.distill, a.data, a.optim, a.trainer, a.run),
        [teacher_weights, f"--distill.tokens={out / 'masks' / 'tokens.pt'}"],
    )

    # 6. evaluate
    results: dict[str, dict[str, float]] = {}
    eval_dir = out / "evaluate"
    eval_start, evaluated = time.perf_counter(), False
    for label, run_name, config in (
        ("teacher", "teacher", "teacher.yaml"),
        ("student", "student", "student.yaml"),
        ("student + MasKD", "distill", "student.yaml"),
    ):
        path = eval_dir / f"{run_name}.json"
        if not path.is_file():
            evaluated = True
            _log(f"evaluating {label}")
            _, _, a = _stage_args(
                "train",
                cfg_dir / config,
                [
                    *common,
                    f"--run.out={out / run_name}",
                    f"--model.weights={out / run_name / 'model.pt'}",
                ],
            )
            run_evaluate(a.model, a.data, a.trainer, str(path))
        results[label] = json.loads(path.read_text())
    if evaluated:
        timings.record("evaluate", time.perf_counter() - eval_start, False)

    # 7. report
    _log("writing the report")
    report = _write_report(out, task, cfg_dir, results, timings.data, demo_cfg)
    _log(f"finished in {time.perf_counter() - total_start:.0f} s this run")
    return report


def benchmark_results(task: str) -> Path | None:
    """The quality benchmark's committed table for ``task`` (source tree or current folder)."""
    name = f"quality_{task}_cpu.json"
    for root in (Path.cwd(), Path(__file__).resolve().parents[2]):
        path = root / "benchmarks" / "results" / name
        if path.is_file():
            return path
    return None


def _spread_lines(task: str, unit: str) -> list[str]:
    """The benchmark's seed-to-seed spread: what a difference of one demo run is worth."""
    path = benchmark_results(task)
    if path is None:
        return []
    report = json.loads(path.read_text())
    rows = {r["row"]: r for r in report["rows"]}
    if "student" not in rows or "maskd" not in rows:
        return []
    student, maskd = rows["student"], rows["maskd"]

    def seeds(row: dict[str, Any]) -> str:
        return ", ".join(f"{v:.1f}" for v in row["test"])

    return [
        "## How much is noise",
        "",
        "One run per model, as above, cannot tell a gain from seed-to-seed noise. The quality "
        f"benchmark (`{path.name}`, the same kind of data at full size, test split, "
        f"{len(student['test'])} seeds) measured:",
        "",
        f"| model | {unit}, mean ± std over seeds | per seed |",
        "|---|---|---|",
        f"| teacher | {report['teacher']['test']:.1f} | |",
        f"| student alone | {student['mean']:.1f} ± {student['std']:.1f} | {seeds(student)} |",
        f"| student + MasKD | {maskd['mean']:.1f} ± {maskd['std']:.1f} | {seeds(maskd)} |",
        "",
        f"Paired difference to the student alone (same seed): {maskd['diff_mean']:+.1f} ± "
        f"{maskd['diff_std']:.1f}. A difference in this demo smaller than the student's "
        f"seed-to-seed std ({student['std']:.1f}) is within noise.",
        "",
    ]


def _token_png(out: Path, task: str, n: int) -> Path:
    from maskd.data import IMAGENET_MEAN, IMAGENET_STD, build_dataset, build_transforms
    from maskd.engine.config import ModelArgs
    from maskd.engine.jobs import build_model
    from maskd.token_io import load_tokens
    from maskd.visualize import save_mask_png, token_masks_and_summary

    cfg = yaml.safe_load((out / "masks" / "config.yaml").read_text())
    t = cfg["teacher"]
    kind = cfg["data"]["kind"]
    val = build_dataset(
        kind,
        out / "data",
        cfg["data"]["val_split"],
        build_transforms(task, False, cfg["data"].get("val_size")),
    )
    teacher, _, _ = build_model(
        ModelArgs(
            name=t["name"],
            num_classes=val.num_classes,
            weights=str(out / "teacher" / "model.pt"),
            options=t.get("options") or {},
        ),
        val.num_classes,
    )
    images = [val[i][0] for i in range(min(n, len(val)))]
    masks, summary = token_masks_and_summary(
        teacher, load_tokens(out / "masks" / "tokens.pt"), images
    )
    norm = (IMAGENET_MEAN, IMAGENET_STD) if task == "segmentation" else (None, None)
    return save_mask_png(images, masks, out / "token_masks.png", *norm, summary)


def _write_report(
    out: Path,
    task: str,
    cfg_dir: Path,
    results: dict[str, dict[str, float]],
    timings: dict[str, Any],
    demo_cfg: dict[str, Any],
) -> Path:
    from maskd.visualize import save_loss_png

    save_loss_png(
        {
            "teacher": out / "teacher",
            "student (alone)": out / "student",
            "stage 1: tokens": out / "masks",
            "stage 2: student + MasKD": out / "distill",
        },
        out / "loss_curves.png",
    )
    _token_png(out, task, int(demo_cfg.get("mask_images", 4)))

    def model_name(run: str, key: str) -> str:
        cfg = yaml.safe_load((out / run / "config.yaml").read_text())
        return cfg[key]["name"]

    names = {
        "teacher": model_name("teacher", "model"),
        "student": model_name("student", "model"),
        "student + MasKD": model_name("distill", "student"),
    }
    if task == "detection":
        cols = [
            ("map", "AP"),
            ("map_50", "AP50"),
            ("map_75", "AP75"),
            ("map_small", "AP_S"),
            ("map_medium", "AP_M"),
            ("map_large", "AP_L"),
        ]
    else:
        cols = [("miou", "mIoU"), ("pixel_acc", "pixel acc.")]
    cols = [(k, label) for k, label in cols if any(k in r for r in results.values())]

    def fmt(v: float | None) -> str:
        if v is None:
            return "–"
        if v < 0:  # pycocotools' "no objects of this size"
            return "n/a"
        return f"{100 * v:.1f}"

    d = demo_cfg["data"]
    lines = [
        f"# maskd demo — {task}",
        "",
        f"Synthetic {task} data: {d['train']} training / {d['val']} validation images of "
        f"{d['size']}×{d['size']} px (seed {d.get('seed', 0)}). Stage configs: `{cfg_dir}`.",
        "Every number below was computed by this run on the validation split.",
        "",
        "## Metrics",
        "",
        "| model | architecture | " + " | ".join(label for _, label in cols) + " |",
        "|---|---|" + "---|" * len(cols),
    ]
    for label, metrics in results.items():
        row = " | ".join(fmt(metrics.get(k)) for k, _ in cols)
        lines.append(f"| {label} | `{names[label]}` | {row} |")
    unit = "AP" if task == "detection" else "mIoU"
    key = cols[0][0]
    score = {label: 100 * r.get(key, float("nan")) for label, r in results.items()}
    gap = score["teacher"] - score["student"]
    closed = (score["student + MasKD"] - score["student"]) / gap if gap > 0 else None
    lines += [
        "",
        f"{unit} in percent. The student baseline and the distilled student share the recipe "
        "(initialisation seed, data order, schedule, steps); only the MasKD loss differs.",
        "",
        f"Teacher ahead of the student alone by {gap:.1f} points; the distilled student is "
        f"{score['student + MasKD'] - score['student']:+.1f} points from the student alone"
        + (f" ({100 * closed:.0f} % of the gap closed)." if closed is not None else "."),
        "",
        *_spread_lines(task, unit),
        "## Timings",
        "",
        "| stage | seconds | note |",
        "|---|---|---|",
    ]
    total = 0.0
    for stage_name in STAGES:
        if stage_name in timings:
            t = timings[stage_name]
            total += t["seconds"]
            note = "resumed after an interruption (this attempt only)" if t.get("resumed") else ""
            lines.append(f"| {stage_name} | {t['seconds']:.1f} | {note} |")
    lines += [
        f"| total | {total:.1f} | |",
        "",
        "## Figures",
        "",
        "- `loss_curves.png`: training losses of every stage (log scale).",
        "- `token_masks.png`: each receptive token's mask over validation images, per level.",
        "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
