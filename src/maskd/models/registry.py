"""The model registry: names → builders, lookup with suggestions, and the summary table."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from maskd.errors import UserTypeError, UserValueError
from maskd.models.detection import DETECTION_BACKBONES, DETECTORS, build_detector
from maskd.models.segmentation import SEGMENTATION_ARCHS, build_segmenter, segmentation_layers
from maskd.models.weights import load_checkpoint

Task = Literal["detection", "segmentation"]
# Class counts used by describe() when none is given: COCO and Cityscapes.
DEFAULT_CLASSES: dict[str, int] = {"detection": 80, "segmentation": 19}


@dataclass(frozen=True)
class ModelSpec:
    """One registry entry: ``builder(num_classes, backbone_weights, pretrained, **kwargs)``."""

    name: str
    task: Task
    builder: Callable[..., tuple[nn.Module, list[str]]]
    alternative_layers: dict[str, list[str]] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelInfo:
    """A row of ``maskd models``: what ``describe()`` returns per model."""

    name: str
    task: Task
    num_params: int
    default_layers: list[str]
    alternative_layers: dict[str, list[str]]


def _detector(arch: str, backbone: str) -> Callable[..., tuple[nn.Module, list[str]]]:
    def build(**kwargs: Any) -> tuple[nn.Module, list[str]]:
        return build_detector(arch, backbone, **kwargs)

    return build


def _segmenter(arch: str, backbone: str) -> Callable[..., tuple[nn.Module, list[str]]]:
    def build(**kwargs: Any) -> tuple[nn.Module, list[str]]:
        return build_segmenter(arch, backbone, **kwargs)

    return build


def _make_registry() -> dict[str, ModelSpec]:
    specs: dict[str, ModelSpec] = {}
    for arch in DETECTORS:
        for backbone in DETECTION_BACKBONES:
            name = f"{arch}_{backbone}_fpn"
            specs[name] = ModelSpec(
                name, "detection", _detector(arch, backbone), {"backbone": ["backbone.body"]}
            )
    for arch, backbones in SEGMENTATION_ARCHS.items():
        for backbone in backbones:
            name = f"{arch}_{backbone}"
            alt = {"backbone": segmentation_layers(arch, backbone)["backbone"]}
            specs[name] = ModelSpec(name, "segmentation", _segmenter(arch, backbone), alt)
    return specs


REGISTRY: dict[str, ModelSpec] = _make_registry()


def available(task: Task | None = None) -> list[str]:
    """Sorted registry names, optionally only those of one task."""
    if task is not None and task not in DEFAULT_CLASSES:
        raise UserValueError(f"task must be 'detection', 'segmentation' or None, got {task!r}")
    return sorted(n for n, s in REGISTRY.items() if task is None or s.task == task)


def get_spec(name: str) -> ModelSpec:
    """The registry entry for ``name``; ValueError with close matches when unknown."""
    if not isinstance(name, str):
        raise UserTypeError(f"model name must be a str, got {type(name).__name__}")
    if name in REGISTRY:
        return REGISTRY[name]
    close = difflib.get_close_matches(name, list(REGISTRY), n=5, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise UserValueError(f"unknown model {name!r}{hint} (available: {', '.join(available())})")


def task_of(name: str) -> Task:
    """``"detection"`` or ``"segmentation"`` for a registry name."""
    return get_spec(name).task


def build(
    name: str,
    num_classes: int,
    weights: str | Path | None = None,
    backbone_weights: str | Path | None = None,
    *,
    weights_prefix: str | None = None,
    **kwargs: Any,
) -> tuple[nn.Module, list[str]]:
    """Build registry model ``name``; returns ``(task_model, default_layers)``.

    Args:
        name: a name from :func:`available` (e.g. ``"retinanet_resnet50_fpn"``).
        num_classes: foreground classes for detection (a background class is added),
            all classes for segmentation.
        weights: a whole-model checkpoint on disk (see :func:`load_checkpoint`).
        backbone_weights: ImageNet weights on disk in torchvision's key format.
        weights_prefix: key prefix of the model inside ``weights`` (``"model."``); inferred
            when None.
        **kwargs: detection: ``min_size``, ``max_size``, ``trainable_backbone_layers``,
            ``frozen_bn`` and torchvision detector options; segmentation: ``aux_loss``,
            ``ignore_index``, ``aux_weight``, ``layers`` ("logits" | "backbone").

    The returned layer paths are ``named_modules()`` names of the returned model.
    """
    spec = get_spec(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int):
        raise UserTypeError(f"num_classes must be an int, got {type(num_classes).__name__}")
    if num_classes < 1:
        raise UserValueError(f"num_classes must be >= 1, got {num_classes}")
    for arg, value in (("weights", weights), ("backbone_weights", backbone_weights)):
        if value is not None and not isinstance(value, str | Path):
            raise UserTypeError(
                f"{arg} must be a path (str or Path) or None, got {type(value).__name__}"
            )
        if value is not None and not Path(value).is_file():
            raise FileNotFoundError(f"{arg}: no such file {str(value)!r}")
    if weights_prefix is not None and weights is None:
        raise UserValueError("weights_prefix is only used with weights=PATH, which is not given")
    model, layers = spec.builder(
        num_classes=num_classes,
        backbone_weights=backbone_weights,
        pretrained=weights is not None,
        **kwargs,
    )
    if weights is not None:
        load_checkpoint(model, weights, prefix=weights_prefix)
    return model, layers


def describe(num_classes: int | None = None, task: Task | None = None) -> list[ModelInfo]:
    """One :class:`ModelInfo` per registry model (sorted by name) for ``maskd models``.

    Parameter counts are for ``num_classes`` classes (default: 80 for detection as COCO,
    19 for segmentation as Cityscapes). Models are built on the meta device: no memory is
    allocated and no weights are initialised.
    """
    rows = []
    for name in available(task):
        spec = REGISTRY[name]
        classes = num_classes if num_classes is not None else DEFAULT_CLASSES[spec.task]
        with torch.device("meta"):
            model, layers = build(name, classes)
        rows.append(
            ModelInfo(
                name=name,
                task=spec.task,
                num_params=sum(p.numel() for p in model.parameters()),
                default_layers=layers,
                alternative_layers=dict(spec.alternative_layers),
            )
        )
    return rows
