"""The four jobs behind the command line: train, learn-masks, distill, evaluate.

Each job builds its models and data from option groups, runs Lightning, and leaves
in its output folder::

    checkpoints/last.ckpt   resumable checkpoint (written atomically)
    tensorboard/, csv/      every loss term, the learning rate, metrics
    model.pt                the trained task model's plain state dict (train / distill)
    tokens.pt               the learned tokens (learn-masks; maskd.save_tokens format)
    metrics.json            final validation metrics
    done.json               written last: the job finished
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
from torch import nn
from torch.utils.data import Dataset, Subset

from maskd._checks import check_number
from maskd.atomic import remove_stale_temporaries
from maskd.engine.callbacks import FitClock, MaskImageLogger, TokenSaver
from maskd.engine.checkpoint import atomic_save, find_last_checkpoint
from maskd.engine.config import DataArgs, ModelArgs
from maskd.engine.datamodule import MaskdDataModule
from maskd.engine.interrupt import Interrupted, SignalReceived, StopOnSignal
from maskd.engine.modules import DistillModule, LearnMasksModule, MaskdModule, TrainModule
from maskd.engine.optim import OptimSpec
from maskd.engine.run_lock import RunLock
from maskd.engine.trainer import TrainerSpec, build_trainer
from maskd.errors import UserValueError
from maskd.models.weights import load_file
from maskd.torch_files import refusal

__all__ = [
    "DistillArgs",
    "MaskArgs",
    "build_data",
    "build_model",
    "distill_terms",
    "load_token_file",
    "run_distill",
    "run_evaluate",
    "run_learn_masks",
    "run_train",
]


class ConfigError(UserValueError):
    """A problem with the user's options (reported as one line by the command line)."""


@dataclass
class MaskArgs:
    """Stage-1 options.

    Args:
        layers: teacher layer paths to learn tokens on (``None``: the model's default layers,
            the FPN outputs for detectors, the logits for segmenters).
        num_tokens: ``T`` tokens per level (authors: 6 detection, 8 segmentation).
        weighted: token-weighting head (authors: on for detection, off for segmentation).
        dice_weight: scale of the Dice diversity loss.
        mask_images: fixed validation images whose masks are logged after each validation;
            at the end, each token's coverage and head weight over them are printed and
            written to ``token_summary.json``.
        teacher_mode: ``eval`` (the teacher's BatchNorm and Dropout in eval mode; authors'
            detection) or ``train`` (BatchNorm on batch statistics, Dropout active; authors'
            segmentation). The teacher's parameters never train either way; see
            ``maskd.TokenLearner``.
    """

    layers: list[str] | None = None
    num_tokens: int = 6
    weighted: bool = True
    dice_weight: float = 1.0
    mask_images: int = 4
    teacher_mode: Literal["eval", "train"] = "eval"


@dataclass
class DistillArgs:
    """Stage-2 options: a list of distillation terms, or the shorthand for a plain MasKD run.

    ``terms`` is the list the run distils with (:mod:`maskd.terms`). The other options are a
    shorthand that :func:`distill_terms` turns into terms, so a plain MasKD config stays short:
    ``tokens`` (not null) with no ``maskd`` entry in ``terms`` adds one ``maskd`` term per
    pair (first in the list), ``head_kd`` one head term (last).

    Args:
        tokens: token file from ``maskd learn-masks`` (``tokens.pt``) or a released MasKD
            mask checkpoint: the tokens of the shorthand MasKD terms, and of a ``maskd`` entry
            of ``terms`` that names no ``tokens`` file of its own; ``null``: no shorthand
            MasKD (a peer method of ``terms`` alone).
        pairs: ``{student layer: teacher layer}`` (``None``: the two models' default layers,
            in order): one shorthand MasKD term each; the first pair also gives the layers
            of a term that names none.
        loss_weight: shorthand MasKD: the terms' ``weight`` (authors: 1 Faster R-CNN,
            7 RetinaNet, 10 FCOS, 0.5 segmentation).
        custom_mask_warmup: shorthand MasKD: optimizer steps before the student-side mask
            is multiplied in (``None``: never).
        align: shorthand MasKD: 1×1 conv connectors (the authors use them even for equal
            channels).
        resize: resize student features to the teacher's size when they differ (every
            layer term).
        eps: shorthand MasKD: added to each mask's area (authors: 1e-5 for segmentation).
        token_weights: shorthand MasKD: ``head`` (weighted tokens use their head's weights,
            as the authors) or ``equal`` (every token ``1 / T``, the head unused).
        head_kd: shorthand for the authors' head term: ``retinanet_l1`` (L1 on RetinaNet's
            box-regression outputs), ``rcnn_smoothl1`` (SmoothL1 on Faster R-CNN's RoI box
            regression, the teacher's RoI head fed the student's proposals), ``auto`` (the
            one for the student's architecture) or ``null`` (off).
        head_kd_weight: the head term's weight (authors: 1).
        reuse_tokens: shorthand MasKD: ``{teacher layer: teacher layer whose tokens it
            uses}`` (the term's ``tokens_from``), e.g. the auxiliary head's logits distilled
            with the main logits' tokens, as the authors do in segmentation.
        layer_weights: shorthand MasKD: ``{teacher layer: multiplier}`` of every level of
            its masked loss (the term's ``level_weights``; authors: 0.4 for the auxiliary
            head's logits).
        levels: shorthand MasKD: ``{teacher layer: [level keys]}``, the levels of that layer
            to distil (the term's ``levels``, e.g. ``["0", "1", "2"]`` of an FPN; default:
            every level).
        terms: distillation terms, each ``{kind: maskd|fitnet|cwd|fgd|logits_kd|
            retinanet_l1|rcnn_smoothl1, student: layer, teacher: layer, weight: w,
            ...options}``; ``student`` / ``teacher`` default to the first pair's, a
            ``maskd`` term's ``tokens`` (a file) to ``distill.tokens``.
        teacher_cache: a teacher layer whose output is kept in memory per training sample,
            so that a sample seen before skips it (``backbone.body``: a torchvision
            detector's trunk; ``model.backbone``: a segmenter's); ``null``: off
            (``maskd.Distiller``'s ``teacher_cache`` says what the layer must satisfy). It
            pays where the teacher's forward is a large share of a step, as on a CPU; each
            sample's key is hashed on the host.
        teacher_cache_gib: the most GiB the cache holds in memory.
        teacher_cache_dir: a folder where the cached outputs are also written and read, so
            that runs of one teacher share them (``null``: memory only).
    """

    tokens: str | None = "tokens.pt"
    pairs: dict[str, str] | None = None
    loss_weight: float = 1.0
    custom_mask_warmup: int | None = None
    align: bool = True
    resize: bool = False
    eps: float = 0.0
    token_weights: Literal["head", "equal"] = "head"
    head_kd: Literal["auto", "retinanet_l1", "rcnn_smoothl1"] | None = None
    head_kd_weight: float = 1.0
    reuse_tokens: dict[str, str] | None = None
    layer_weights: dict[str, float] | None = None
    levels: dict[str, list[str]] | None = None
    terms: list[dict[str, Any]] | None = None
    teacher_cache: str | None = None
    teacher_cache_gib: float = 4.0
    teacher_cache_dir: str | None = None


# The shorthand options of the MasKD terms and their defaults (DistillArgs').
_MASKD_SHORTHAND: dict[str, Any] = {
    "loss_weight": 1.0,
    "custom_mask_warmup": None,
    "align": True,
    "eps": 0.0,
    "token_weights": "head",
    "reuse_tokens": None,
    "layer_weights": None,
    "levels": None,
}
# distill.head_kd: auto, by the registry name's architecture.
_HEAD_KD = {"retinanet": "retinanet_l1", "fasterrcnn": "rcnn_smoothl1"}


def distill_terms(
    distill: DistillArgs, task: str, student: str, pairs: Mapping[str, str] | None
) -> list[dict[str, Any]]:
    """The term specs of a distill run: ``distill.terms`` and the shorthand turned into terms.

    The one place the shorthand options become terms, in this order:

    1. ``tokens`` set and no ``maskd`` entry in ``terms``: one ``maskd`` term per pair
       (named ``maskd``, then ``maskd_2``, ...) with ``weight: loss_weight``, ``align``,
       ``eps``, ``custom_mask_warmup``, ``token_weights`` (when ``equal``),
       ``tokens_from: reuse_tokens[teacher]`` and
       ``level_weights: layer_weights[teacher]``, ``levels: levels[teacher]``;
    2. ``terms`` in order, a missing ``student`` / ``teacher`` taken from the first pair, a
       ``maskd`` term's missing ``tokens`` from ``distill.tokens``;
    3. ``head_kd``: its term, with ``weight: head_kd_weight``.

    ``resize: true`` applies to every layer term that does not set it. ``tokens`` of a
    ``maskd`` spec stay file paths here (:func:`run_distill` loads them).

    Args:
        distill: the options.
        task: ``detection`` or ``segmentation``.
        student: the student's registry name (``head_kd: auto`` reads its architecture).
        pairs: the distilled pairs; ``None`` (before the models are built): check only,
            layers are not filled in and the shorthand gives one ``maskd`` spec that names
            only its token file.

    Raises:
        ConfigError: an unknown kind or option (the valid ones named), a term the task cannot
            take, a shorthand option beside an explicit ``maskd`` term, or a layer named in
            ``reuse_tokens`` / ``layer_weights`` / ``levels`` that is not distilled.
    """
    from maskd.terms import FeatureTerm, HeadTerm, MaskdTerm, check_spec

    explicit: list[dict[str, Any]] = []
    for i, spec in enumerate(distill.terms or []):
        try:
            cls = check_spec(spec, complete=False)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"distill.terms[{i}]: {err}") from None
        kind = spec["kind"]
        if task != "detection" and (kind == "fgd" or issubclass(cls, HeadTerm)):
            raise ConfigError(
                f"distill.terms[{i}]: {kind} needs a detector (ground-truth boxes or a "
                f"detection head), but the student is a {task} model"
            )
        if cls is MaskdTerm and "tokens" in spec and not isinstance(spec["tokens"], str):
            raise ConfigError(
                f"distill.terms[{i}]: tokens must be a token file path, got {spec['tokens']!r}"
            )
        explicit.append(dict(spec))
    has_maskd = any(spec["kind"] == "maskd" for spec in explicit)
    changed = [k for k, v in _MASKD_SHORTHAND.items() if getattr(distill, k) != v]
    if has_maskd and changed:
        raise ConfigError(
            f"distill.{changed[0]} is shorthand for the MasKD terms of distill.pairs, but "
            "distill.terms has a maskd entry: set its options there (weight, align, eps, "
            "custom_mask_warmup, token_weights, tokens_from, level_weights, levels)"
        )
    first = next(iter(pairs.items())) if pairs else None
    specs: list[dict[str, Any]] = []
    if distill.tokens is not None and not has_maskd:
        # before the models are built: the shorthand's token file, without its layers
        shorthand = [{"kind": "maskd", "tokens": distill.tokens}]
        specs += _shorthand_maskd(distill, pairs) if pairs is not None else shorthand
    for i, spec in enumerate(explicit):
        cls = check_spec(spec, complete=False)
        if issubclass(cls, FeatureTerm) and first is not None:
            spec = {"student": first[0], "teacher": first[1], **spec}
            if distill.resize:
                spec.setdefault("resize", True)
        if cls is MaskdTerm and "tokens" not in spec:
            if distill.tokens is None:
                raise ConfigError(
                    f"distill.terms[{i}]: the maskd term needs tokens: set distill.tokens or "
                    "the term's tokens (a token file)"
                )
            spec["tokens"] = distill.tokens
        specs.append(spec)
    if distill.head_kd is not None:
        kind = _head_kd_kind(distill.head_kd, task, student)
        specs.append({"kind": kind, "weight": distill.head_kd_weight})
    if distill.tokens is None and not explicit and distill.head_kd is None:
        raise ConfigError(
            "distill.tokens is null, distill.terms is empty and distill.head_kd is null: "
            "nothing to distil"
        )
    return specs


def check_token_files(distill: DistillArgs, task: str, student: str) -> None:
    """Every token file a distill run reads exists (the files :func:`distill_terms` names).

    Raises:
        ConfigError: as :func:`distill_terms`.
        FileNotFoundError: a missing file, named by the option that gives it
            (``distill.tokens`` or ``distill.terms[i].tokens``).
    """
    named = {
        spec["tokens"]: f"distill.terms[{i}].tokens"
        for i, spec in reversed(list(enumerate(distill.terms or [])))
        if isinstance(spec, dict) and isinstance(spec.get("tokens"), str)
    }
    named[distill.tokens] = "distill.tokens"
    specs = distill_terms(distill, task, student, None)
    for path in dict.fromkeys(s["tokens"] for s in specs if s["kind"] == "maskd"):
        if not Path(path).is_file():
            raise FileNotFoundError(
                f"{named[path]}: no such token file {path!r} (`maskd learn-masks` writes "
                "tokens.pt); to distil with other terms only, set distill.tokens: null"
            )


def _shorthand_maskd(distill: DistillArgs, pairs: Mapping[str, str]) -> list[dict[str, Any]]:
    """One ``maskd`` term per pair, from the shorthand options."""
    teachers = list(pairs.values())
    for option in ("reuse_tokens", "layer_weights", "levels"):
        unknown = sorted(str(k) for k in (getattr(distill, option) or {}) if k not in teachers)
        if unknown:
            raise ConfigError(
                f"distill.{option} names {unknown}, which are not distilled teacher layers "
                f"{teachers}"
            )
    reuse, weights = distill.reuse_tokens or {}, distill.layer_weights or {}
    levels = distill.levels or {}
    specs = []
    for i, (s_layer, t_layer) in enumerate(pairs.items()):
        spec: dict[str, Any] = {"kind": "maskd", "student": s_layer, "teacher": t_layer}
        if i:
            spec["name"] = f"maskd_{i + 1}"
        spec.update(
            tokens=distill.tokens,
            weight=distill.loss_weight,
            align=distill.align,
            eps=distill.eps,
            custom_mask_warmup=distill.custom_mask_warmup,
        )
        if distill.resize:
            spec["resize"] = True
        if distill.token_weights != "head":
            spec["token_weights"] = distill.token_weights
        if t_layer in reuse:
            spec["tokens_from"] = reuse[t_layer]
        if t_layer in weights:
            spec["level_weights"] = weights[t_layer]
        if t_layer in levels:
            spec["levels"] = levels[t_layer]
        specs.append(spec)
    return specs


def _head_kd_kind(mode: str, task: str, student: str) -> str:
    """The head term of ``distill.head_kd`` (``auto``: by the student's architecture)."""
    if task != "detection":
        raise ConfigError(
            f"distill.head_kd {mode!r} needs a detector (RetinaNet or Faster R-CNN), but "
            f"{student!r} is a {task} model; set distill.head_kd null"
        )
    if mode != "auto":
        return mode
    arch = student.split("_", 1)[0]
    if arch not in _HEAD_KD:
        raise ConfigError(
            f"distill.head_kd 'auto': no head term for {student!r}; head KD exists for "
            "RetinaNet (retinanet_l1) and Faster R-CNN (rcnn_smoothl1) students only (the "
            "authors use none for FCOS); set distill.head_kd null"
        )
    return _HEAD_KD[arch]


@dataclass
class RunArgs:
    """Where and how a job runs.

    Args:
        out: output folder.
        seed: seed of model initialisation, data order, augmentation and per-step randomness.
        resume: ``last`` (``<out>/checkpoints/last.ckpt``) or a checkpoint path to continue.
        overwrite: start over even if ``out`` holds a checkpoint.
        validate: score the model on the validation split after training (``metrics.json``).
    """

    out: str = "runs/job"
    seed: int = 0
    resume: str | None = None
    overwrite: bool = False
    validate: bool = True


# ---- building blocks ----------------------------------------------------------------


def _check_files(*models: ModelArgs) -> None:
    """Fail fast on missing weight files, before any dataset is read."""
    for args in models:
        for key in ("weights", "backbone_weights"):
            value = getattr(args, key)
            if value is not None and not Path(value).is_file():
                raise FileNotFoundError(f"{key}: no such file {value!r} (model {args.name})")
        init = args.init_from
        if init is not None and not Path(init.path).is_file():
            raise FileNotFoundError(
                f"init_from.path: no such file {init.path!r} (model {args.name})"
            )


def build_model(args: ModelArgs, num_classes: int) -> tuple[nn.Module, list[str], str]:
    """``(task_model, default_layers, task)`` from the registry, weights loaded."""
    from maskd import models

    task = models.task_of(args.name)
    classes = args.num_classes if args.num_classes is not None else num_classes
    weights = args.weights
    prefix = None
    if weights is not None:
        prefix = _checkpoint_prefix(weights)
    model, layers = models.build(
        args.name,
        classes,
        weights=weights,
        backbone_weights=args.backbone_weights,
        weights_prefix=prefix,
        **args.options,
    )
    if args.init_from is not None:
        _init_parts(model, args)
    return model, list(layers), task


def _init_parts(model: nn.Module, args: ModelArgs) -> None:
    """Apply ``args.init_from``; prints the tensors copied per model part."""
    from maskd.models.init_from import init_from_checkpoint

    init = args.init_from
    assert init is not None
    # a .ckpt of ours holds the trained model under a prefix ("net.", "net.student.")
    file_prefix = _checkpoint_prefix(init.path, "init_from.path") or ""
    counts = init_from_checkpoint(model, init.path, init.prefixes, file_prefix=file_prefix)
    for src, (dst, n) in zip(init.prefixes, counts.items(), strict=True):
        print(
            f"init_from: {args.name} {dst or '(whole model)'} <- {src or '(every key)'} of "
            f"{init.path}: {n} tensors",
            flush=True,
        )


def _checkpoint_prefix(path: str, argument: str = "weights") -> str | None:
    """The key prefix of the trained model inside one of our Lightning checkpoints."""
    p = Path(path)
    if p.suffix != ".ckpt":
        return None
    obj = load_file(p, argument=argument)  # checks the file exists, once
    meta = obj.get("maskd") if isinstance(obj, Mapping) else None
    if not isinstance(meta, Mapping):
        return None
    if meta.get("job") == "learn-masks":  # stage 1 keeps only the tokens, not the teacher
        raise ConfigError(
            f"{argument}: {path!r} is a `maskd learn-masks` checkpoint, which holds tokens, "
            f"not model weights; give the teacher's weights ({meta.get('teacher', {}).get('weights')!r}) "
            f"or a `maskd train` / `maskd distill` output"
        )
    return meta.get("weights_prefix")


def _limit(dataset: Dataset, n: int) -> Dataset:
    return Subset(dataset, range(min(n, len(dataset)))) if n > 0 else dataset


def _size(value: int | list[int] | None) -> int | tuple[int, int] | None:
    return tuple(value) if isinstance(value, list) else value  # type: ignore[return-value]


def build_data(
    data: DataArgs, task: str, seed: int, train: bool = True
) -> tuple[MaskdDataModule, int]:
    """The data module for ``task`` and the dataset's class count."""
    from maskd.data import build_dataset, build_transforms, collate_for
    from maskd.data import task_of as data_task

    if data_task(data.kind) != task:
        raise ConfigError(
            f"data.kind {data.kind!r} is a {data_task(data.kind)} dataset but the model is a "
            f"{task} model"
        )
    if not Path(data.root).is_dir():
        raise FileNotFoundError(f"data.root: no such folder {data.root!r}")
    opts = dict(data.dataset_options, skip_bad=data.skip_bad)
    val_tf = build_transforms(task, False, _size(data.val_size), **data.val_transforms)
    val_set = build_dataset(data.kind, data.root, data.val_split, val_tf, **opts)
    train_set = None
    if train:
        train_tf = build_transforms(task, True, _size(data.size), **data.train_transforms)
        full_train = build_dataset(data.kind, data.root, data.train_split, train_tf, **opts)
        try:
            full_train.check_usable()
        except ValueError as err:
            raise ConfigError(f"data: training split {data.train_split!r}: {err}") from None
        print(f"data: {data.train_split}: {full_train.summary()}", flush=True)
        train_set = _limit(full_train, data.limit_train)
    group_ids = None
    if train_set is not None and data.aspect_ratio_group_factor not in (None, -1):
        group_ids = _aspect_ratio_groups(train_set, data.aspect_ratio_group_factor)
    print(f"data: {data.val_split}: {val_set.summary()}", flush=True)
    num_classes = int(val_set.num_classes)
    dm = MaskdDataModule(
        train_set,
        _limit(val_set, data.limit_val),
        batch_size=data.batch_size,
        val_batch_size=data.val_batch_size,
        num_workers=data.num_workers,
        seed=seed,
        collate_fn=collate_for(task),
        group_ids=group_ids,
    )
    return dm, num_classes


def _aspect_ratio_groups(dataset: Dataset, factor: int) -> list[int]:
    """Aspect-ratio group per training image (sizes from the annotations); prints the counts."""
    from maskd.engine.sampling import aspect_ratio_groups, image_sizes

    try:
        groups = aspect_ratio_groups(image_sizes(dataset), factor)
    except ValueError as err:
        raise ConfigError(f"data.aspect_ratio_group_factor: {err}") from None
    counts = [groups.count(g) for g in range(2 * factor + 2)]
    print(f"data: aspect-ratio groups (factor {factor}): images per group {counts}", flush=True)
    return groups


def load_token_file(path: str, teacher_layers: list[str]) -> dict[str, list]:
    """Tokens from our own file, or from a released MasKD checkpoint (one teacher layer)."""
    from maskd.token_io import load_official_tokens, load_tokens

    try:
        return load_tokens(path)  # a missing file: FileNotFoundError, named there
    except ValueError as own_err:
        try:
            official = load_official_tokens(path)
        except (ValueError, TypeError, KeyError):
            raise own_err from None
    if len(teacher_layers) != 1:
        raise ConfigError(
            f"tokens: {path} is a released MasKD checkpoint (levels only, no layer names); "
            f"distil exactly one teacher layer with it, not {teacher_layers}"
        )
    return {teacher_layers[0]: list(official)}


def _load_term_tokens(specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ``maskd`` specs with their token files loaded: ``{source layer: [tokens]}``."""
    from maskd.terms import MaskdTerm, check_spec

    sources: dict[str, list[str]] = {}  # file -> the source layers read from it
    for spec in specs:
        if check_spec(spec) is MaskdTerm:
            source = spec.get("tokens_from") or spec["teacher"]
            sources.setdefault(spec["tokens"], [])
            if source not in sources[spec["tokens"]]:
                sources[spec["tokens"]].append(source)
    loaded: dict[str, dict[str, list]] = {}
    for path, layers in sources.items():
        tokens = load_token_file(path, layers)
        missing = [layer for layer in layers if layer not in tokens]
        if missing:
            raise ConfigError(
                f"distill.tokens: {path} holds tokens for the teacher layer(s) "
                f"{sorted(tokens)}, not for {missing}; learn tokens on those layers, or distil "
                "the layers the file holds (distill.pairs)"
            )
        loaded[path] = tokens
    out = []
    for spec in specs:
        if check_spec(spec) is MaskdTerm:
            spec = {**spec, "tokens": loaded[spec["tokens"]]}
        out.append(spec)
    return out


# ---- running --------------------------------------------------------------------------


def _check_resumable(path: Path, argument: str) -> str:
    """A checkpoint file Lightning can open: not empty, not truncated (a whole zip archive)."""
    if path.stat().st_size == 0:
        raise UserValueError(f"{argument}: {str(path)!r} is empty (0 bytes)")
    if not zipfile.is_zipfile(path):
        raise UserValueError(
            f"{argument}: {str(path)!r} is truncated or not a torch checkpoint; "
            "start over with --run.overwrite true, or resume from another checkpoint"
        )
    return str(path)


_OUTPUTS = ("done.json", "model.pt", "tokens.pt")  # what a run leaves besides checkpoints


def _resume_path(run: RunArgs) -> str | None:
    out = Path(run.out)
    earlier = [name for name in _OUTPUTS if (out / name).is_file()]
    if run.resume is None:
        last = find_last_checkpoint(out)
        if last is not None and not run.overwrite:
            raise ConfigError(
                f"{out} already holds a checkpoint ({last}); pass --run.resume last to continue "
                "it or --run.overwrite true to start over"
            )
        if earlier and not run.overwrite:
            raise ConfigError(
                f"{out} already holds a run's outputs ({', '.join(earlier)}) and no checkpoint "
                "to continue from; pass --run.overwrite true to replace them, or another --run.out"
            )
        if run.overwrite:
            # Start over: drop what marks the old run as resumable or finished.
            for name in ("checkpoints/last.ckpt", "done.json", "metrics.json"):
                (out / name).unlink(missing_ok=True)
        return None
    if run.resume in ("last", "auto"):
        last = find_last_checkpoint(out)
        if last is None:
            if run.resume == "auto" and earlier and not run.overwrite:
                raise ConfigError(
                    f"--run.resume auto: {out} holds a run's outputs ({', '.join(earlier)}) "
                    "but no checkpoint to continue from; pass --run.overwrite true to replace them"
                )
            if run.resume == "auto":
                return None
            raise FileNotFoundError(f"--run.resume last: no checkpoint in {out / 'checkpoints'}")
        return _check_resumable(last, "run.resume")
    if not Path(run.resume).is_file():
        raise FileNotFoundError(f"run.resume: no such checkpoint {run.resume!r}")
    return _check_resumable(Path(run.resume), "run.resume")


def _describe_run(meta: Mapping[str, Any]) -> str:
    """``maskd distill`` of fcos_resnet18_fpn from fcos_resnet50_fpn, 81 classes."""
    job = meta.get("job", "?")
    model = (meta.get("model") or {}).get("name")
    teacher = (meta.get("teacher") or {}).get("name")
    what = {"train": f"{model}", "learn-masks": f"tokens on {teacher}"}.get(
        job, f"{model} from {teacher}"
    )
    return f"`maskd {job}` of {what}, {meta.get('num_classes', '?')} classes"


def _check_checkpoint(path: str, module: MaskdModule) -> None:
    """Refuse, before anything is written, a checkpoint of another job, model or teacher."""
    obj = load_file(path, argument="run.resume", mmap=True)
    meta = obj.get("maskd") if isinstance(obj, Mapping) else None
    if not isinstance(meta, Mapping):
        raise ConfigError(f"run.resume: {path!r} is not a checkpoint written by maskd")
    want = module.meta
    keys = ("job", "num_classes")
    names = [(m.get(k) or {}).get("name") for m in (meta, want) for k in ("model", "teacher")]
    if any(meta.get(k) != want.get(k) for k in keys) or names[:2] != names[2:]:
        raise ConfigError(
            f"run.resume: {path!r} is a checkpoint of {_describe_run(meta)}; this run is "
            f"{_describe_run(want)}"
        )
    module.check_teacher(obj.get("maskd_teacher"), f"run.resume: {path!r}")


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def _fit_and_finish(
    module: MaskdModule,
    dm: MaskdDataModule,
    trainer_spec: TrainerSpec,
    run: RunArgs,
    callbacks: list | None,
    state_dict: Any,
    on_start: Callable[[], None] | None = None,
) -> dict[str, float]:
    """Fit (or resume), then write ``model.pt``, ``metrics.json`` and ``done.json``.

    Everything that can refuse the run (the resume checkpoint's job, model and teacher) is
    checked before the first write; ``on_start`` (e.g. saving the resolved config) runs then.
    """
    out = Path(run.out)
    with RunLock(out) as lock:  # held from here (or from the folder's creation) to the end
        ckpt = _resume_path(run)
        if ckpt is not None:
            _check_checkpoint(ckpt, module)
        if on_start is not None:
            on_start()
        out.mkdir(parents=True, exist_ok=True)
        lock.acquire()
        # a kill during a checkpoint or weights write leaves a temporary file: drop it
        remove_stale_temporaries(out, ("model.pt", "tokens.pt"))
        remove_stale_temporaries(out / "checkpoints", ("last.ckpt",))
        clock = FitClock()
        trainer = build_trainer(
            trainer_spec, out, callbacks=[*(callbacks or []), StopOnSignal(), clock]
        )
        try:
            trainer.fit(module, datamodule=dm, ckpt_path=ckpt)
        except SignalReceived as sig:  # a second signal, or one before the first step ended
            last = out / "checkpoints" / "last.ckpt"
            kept = last if last.is_file() else None
            raise Interrupted(sig.signum, trainer.global_step, kept, saved=False) from None
        except pickle.UnpicklingError as err:  # raised while Lightning reads the checkpoint
            raise refusal(err, "run.resume", ckpt) from err
        sitting_seconds = clock.sitting
        fit_seconds = clock.before + sitting_seconds
        metrics: dict[str, float] = {}
        if run.validate:
            results = trainer.validate(module, datamodule=dm, verbose=False)
            metrics = {k: float(v) for k, v in (results[0] if results else {}).items()}
        if trainer.is_global_zero:
            if state_dict is not None:
                atomic_save(state_dict(), out / "model.pt")
            _write_json(out / "metrics.json", metrics)
            _write_json(
                out / "done.json",
                {
                    "global_step": trainer.global_step,
                    "fit_seconds": fit_seconds,  # every sitting of a resumed run
                    "sitting_seconds": sitting_seconds,
                    "metrics": metrics,
                },
            )
        return metrics


def _seed(run: RunArgs) -> None:
    L.seed_everything(run.seed, workers=True, verbose=False)


def run_train(
    model: ModelArgs,
    data: DataArgs,
    optim: OptimSpec,
    trainer: TrainerSpec,
    run: RunArgs,
    *,
    on_start: Callable[[], None] | None = None,
) -> dict[str, float]:
    """Train a task model (teacher, or a plain student as the baseline)."""
    from maskd import models

    task = models.task_of(model.name)
    _check_files(model)
    _seed(run)
    dm, num_classes = build_data(data, task, run.seed)
    _seed(run)
    net, _, _ = build_model(model, num_classes)
    meta = {
        "job": "train",
        "model": asdict(model),
        "num_classes": _classes(model, num_classes),
        "weights_prefix": "net.",
    }
    module = TrainModule(
        net, task, _classes(model, num_classes), optim=optim, seed=run.seed, meta=meta
    )
    return _fit_and_finish(module, dm, trainer, run, None, net.state_dict, on_start)


def _classes(model: ModelArgs, num_classes: int) -> int:
    return model.num_classes if model.num_classes is not None else num_classes


def run_learn_masks(
    teacher: ModelArgs,
    masks: MaskArgs,
    data: DataArgs,
    optim: OptimSpec,
    trainer: TrainerSpec,
    run: RunArgs,
    *,
    on_start: Callable[[], None] | None = None,
) -> dict[str, float]:
    """Stage 1: learn receptive tokens on a frozen teacher; writes ``tokens.pt``."""
    from maskd import models
    from maskd.data import IMAGENET_MEAN, IMAGENET_STD
    from maskd.learner import TokenLearner

    task = models.task_of(teacher.name)
    if teacher.weights is None:
        raise ConfigError("teacher.weights is required: tokens are learned on a trained teacher")
    _check_files(teacher)
    _seed(run)
    dm, num_classes = build_data(data, task, run.seed)
    _seed(run)
    net, default_layers, _ = build_model(teacher, num_classes)
    layers = masks.layers or default_layers
    learner = TokenLearner(
        net,
        layers,
        masks.num_tokens,
        masks.weighted,
        masks.dice_weight,
        teacher_mode=masks.teacher_mode,
    )
    classes = _classes(teacher, num_classes)
    meta = {
        "job": "learn-masks",
        "teacher": asdict(teacher),
        "layers": layers,
        "num_classes": classes,
    }
    module = LearnMasksModule(learner, task, classes, optim=optim, seed=run.seed, meta=meta)
    callbacks: list = [TokenSaver(Path(run.out) / "tokens.pt")]
    if masks.mask_images > 0 and dm.val_set is not None:
        n = min(masks.mask_images, len(dm.val_set))
        images = [dm.val_set[i][0] for i in range(n)]
        norm = (IMAGENET_MEAN, IMAGENET_STD) if task == "segmentation" else (None, None)
        if len({tuple(i.shape) for i in images}) == 1:
            summary = Path(run.out) / "token_summary.json"
            callbacks.append(MaskImageLogger(images, *norm, summary_path=summary))
    return _fit_and_finish(module, dm, trainer, run, callbacks, None, on_start)


def run_distill(
    student: ModelArgs,
    teacher: ModelArgs,
    distill: DistillArgs,
    data: DataArgs,
    optim: OptimSpec,
    trainer: TrainerSpec,
    run: RunArgs,
    *,
    on_start: Callable[[], None] | None = None,
) -> dict[str, float]:
    """Stage 2: distil the student through the teacher's frozen tokens; writes ``model.pt``."""
    from maskd import models
    from maskd.distiller import Distiller

    task = models.task_of(student.name)
    if models.task_of(teacher.name) != task:
        raise ConfigError(
            f"student {student.name!r} is a {task} model but teacher {teacher.name!r} is not"
        )
    if teacher.weights is None:
        raise ConfigError("teacher.weights is required: distil from a trained teacher")
    _check_files(student, teacher)
    check_token_files(distill, task, student.name)  # kinds and options too, before any data
    _seed(run)
    dm, num_classes = build_data(data, task, run.seed)
    _seed(run)
    s_net, s_layers, _ = build_model(student, num_classes)
    t_net, t_layers, _ = build_model(teacher, num_classes)
    pairs = distill.pairs
    if pairs is None:
        if len(s_layers) != len(t_layers):
            raise ConfigError(
                f"default layers differ in count (student {s_layers}, teacher {t_layers}); "
                "give distill.pairs"
            )
        pairs = dict(zip(s_layers, t_layers, strict=True))
    terms = _load_term_tokens(distill_terms(distill, task, student.name, pairs))
    check_number(distill.teacher_cache_gib, "distill.teacher_cache_gib", low=0)
    distiller = Distiller(
        s_net,
        t_net,
        terms,
        teacher_cache=distill.teacher_cache,
        teacher_cache_bytes=int(distill.teacher_cache_gib * 2**30),
        teacher_cache_dir=distill.teacher_cache_dir,
    )
    classes = _classes(student, num_classes)
    meta = {
        "job": "distill",
        "model": asdict(student),
        "teacher": asdict(teacher),
        "pairs": pairs,
        "num_classes": classes,
        "weights_prefix": "net.student.",
    }
    module = DistillModule(distiller, task, classes, optim=optim, seed=run.seed, meta=meta)
    return _fit_and_finish(module, dm, trainer, run, None, distiller.student_state_dict, on_start)


def run_evaluate(
    model: ModelArgs, data: DataArgs, trainer: TrainerSpec, out: str | None = None
) -> dict[str, float]:
    """Score a model on the validation split; optionally write the metrics as JSON."""
    from maskd import models

    task = models.task_of(model.name)
    _check_files(model)
    if out:
        _check_writable(Path(out), "out")
    dm, num_classes = build_data(data, task, 0, train=False)
    net, _, _ = build_model(model, num_classes)
    module = TrainModule(net, task, _classes(model, num_classes))
    run_dir = Path(out).parent if out else Path("runs/evaluate")
    lt = build_trainer(trainer, run_dir, evaluation_only=True)
    results = lt.test(module, datamodule=dm, verbose=False)
    metrics = {
        k.removeprefix("test/"): float(v) for k, v in (results[0] if results else {}).items()
    }
    if out and lt.is_global_zero:
        try:
            _write_json(Path(out), metrics)
        except OSError as err:  # the metrics are printed by the caller all the same
            raise OSError(
                f"out: cannot write {out!r} ({err.strerror}); metrics: {metrics}"
            ) from err
    return metrics


def _check_writable(path: Path, argument: str) -> None:
    """Fail before any work when ``path`` cannot be written (its folder made if need be)."""
    if path.is_dir():
        raise IsADirectoryError(f"{argument}: {str(path)!r} is a folder; give a file name")
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OSError(
            f"{argument}: cannot create the folder {str(folder)!r} ({err.strerror})"
        ) from err
    if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise PermissionError(f"{argument}: {str(path)!r} is not writable")
