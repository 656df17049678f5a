"""Option groups shared by the jobs and the command line (each maps to a YAML section)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from maskd._checks import check_number
from maskd.errors import UserValueError

__all__ = ["DataArgs", "InitFrom", "ModelArgs"]


@dataclass
class InitFrom:
    """Named parts of a model initialised from a checkpoint (after its other weights).

    Args:
        path: the checkpoint: a ``model.pt``, a Lightning ``.ckpt`` of ``maskd train`` /
            ``maskd distill`` (its trained model's keys), or any state dict.
        prefixes: ``{checkpoint key prefix: model module path}``, e.g.
            ``{backbone.fpn: backbone.fpn, head: head}`` for a RetinaNet's FPN and head.
    """

    path: str
    prefixes: dict[str, str]


@dataclass
class ModelArgs:
    """A registry model (``maskd models`` lists the names).

    Args:
        name: registry name, e.g. ``retinanet_resnet50_fpn`` or ``deeplabv3_resnet18``.
        num_classes: foreground classes (detection) / classes (segmentation); ``None``
            takes the dataset's count.
        weights: whole-model checkpoint: a ``model.pt`` from ``maskd train``, a Lightning
            ``.ckpt``, or any state dict in torchvision's key format.
        backbone_weights: ImageNet backbone weights on disk (torchvision's key format).
        options: extra builder options, e.g. ``{min_size: 800, max_size: 1333}`` for
            detectors or ``{aux_loss: true}`` for segmenters.
        init_from: parts of the model copied from a checkpoint after ``weights`` /
            ``backbone_weights`` (e.g. a student's FPN and head from its teacher).
    """

    name: str = "retinanet_resnet18_fpn"
    num_classes: int | None = None
    weights: str | None = None
    backbone_weights: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    init_from: InitFrom | None = None


@dataclass
class DataArgs:
    """A dataset on disk and its loaders.

    Args:
        kind: ``coco`` (detection), ``cityscapes``, ``voc`` or ``folder`` (segmentation).
        root: dataset root folder (layouts: see ``maskd.data.build_dataset``).
        train_split: training split name (``train2017`` for COCO).
        val_split: validation split name (``val2017`` for COCO).
        size: training transform size, an int or ``[height, width]``: detection resizes the
            shorter side (``None``: leave it to the detector's own ``min_size``);
            segmentation crops this size (after random scaling).
        val_size: validation transform size (``None``: images as they are; detectors still
            apply their own ``min_size`` / ``max_size``).
        train_transforms: extra training transform options (``scale_range``, ``hflip``, ...).
        val_transforms: extra validation transform options.
        dataset_options: extra ``build_dataset`` options (``image_dir``, ``ann_file``, ...).
        batch_size: training images per process per step.
        val_batch_size: validation images per process.
        num_workers: loader worker processes.
        skip_bad: skip (and count) unreadable samples instead of failing.
        limit_train: use only the first n training images (0: all).
        limit_val: use only the first n validation images (0: all).
        aspect_ratio_group_factor: batch training images of one aspect-ratio group only
            (``height / width`` binned at ``2 ** linspace(-1, 1, 2k + 1)``; torchvision's
            detection references use 3; 0 splits landscape from the rest, as mmdet's
            ``GroupSampler``); sizes come from the annotation file (COCO). ``None`` or -1: off.
    """

    kind: str = "coco"
    root: str = "data"
    train_split: str = "train"
    val_split: str = "val"
    size: int | list[int] | None = None
    val_size: int | list[int] | None = None
    train_transforms: dict[str, Any] = field(default_factory=dict)
    val_transforms: dict[str, Any] = field(default_factory=dict)
    dataset_options: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 2
    val_batch_size: int = 2
    num_workers: int = 0
    skip_bad: bool = False
    limit_train: int = 0
    limit_val: int = 0
    aspect_ratio_group_factor: int | None = None

    def __post_init__(self) -> None:
        for name in ("batch_size", "val_batch_size"):
            check_number(getattr(self, name), f"data.{name}", low=1, integer=True)
        for name in ("num_workers", "limit_train", "limit_val"):
            check_number(getattr(self, name), f"data.{name}", low=0, integer=True)
        for name in ("size", "val_size"):
            sizes = getattr(self, name)
            for v in [] if sizes is None else [sizes] if isinstance(sizes, int) else sizes:
                check_number(v, f"data.{name}", low=1, integer=True)
        for name, size in (("train_transforms", "size"), ("val_transforms", "val_size")):
            if "size" in getattr(self, name):
                raise UserValueError(
                    f"data.{name}: 'size' is not a transform option; set data.{size} instead"
                )
        if self.aspect_ratio_group_factor not in (None, -1):
            check_number(
                self.aspect_ratio_group_factor,
                "data.aspect_ratio_group_factor (-1 or null: off)",
                low=0,
                integer=True,
            )
