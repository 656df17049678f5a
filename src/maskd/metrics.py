"""Evaluation metrics as torchmetrics ``Metric`` objects (states sync across DDP processes).

- :class:`DetectionMetrics`: COCO box AP through torchmetrics' ``MeanAveragePrecision`` with
  the pycocotools backend, i.e. pycocotools' ``COCOeval`` on all accumulated images.
- :class:`SegmentationMetrics`: mIoU, per-class IoU and pixel accuracy from a confusion matrix
  accumulated with torchmetrics' ``multiclass_confusion_matrix``.

Both follow the torchmetrics cycle ``update(...)`` per batch, ``compute()``, ``reset()``;
``compute()`` returns plain Python numbers, ready for logging or JSON.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.detection import MeanAveragePrecision
from torchmetrics.functional.classification import multiclass_confusion_matrix

from maskd.errors import UserTypeError, UserValueError

__all__ = ["DETECTION_KEYS", "DetectionMetrics", "SegmentationMetrics"]

DETECTION_KEYS = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_100")


class DetectionMetrics(MeanAveragePrecision):
    """COCO bounding-box AP (pycocotools ``COCOeval`` with its default parameters).

    ``update(preds, targets)`` takes torchvision-format lists, one dict per image:
    preds ``{"boxes": [K, 4] xyxy, "scores": [K], "labels": [K] int}``, targets
    ``{"boxes": [M, 4] xyxy, "labels": [M] int}`` with optional ``"iscrowd"`` [M] (crowd
    boxes, ignored as in COCO) and ``"area"`` [M] (used for the small/medium/large split
    instead of the box area, as COCO does with segment areas). Other keys are ignored.

    ``compute()`` returns floats for ``map`` (AP@[.5:.95]), ``map_50``, ``map_75``,
    ``map_small``, ``map_medium``, ``map_large`` and ``mar_100``; COCOeval's ``-1`` (no
    ground truth in that range) is kept. Values are COCOeval's ``stats`` exactly, as float32
    (torchmetrics stores them so). With ``class_metrics=True`` also
    ``map_per_class`` (list of floats) and ``classes`` (list of ints).
    """

    def __init__(self, class_metrics: bool = False, **kwargs: Any) -> None:
        for fixed in ("backend", "iou_type", "box_format"):
            if fixed in kwargs:
                raise UserTypeError(f"DetectionMetrics fixes {fixed}; do not pass it")
        super().__init__(
            box_format="xyxy",
            iou_type="bbox",
            backend="pycocotools",
            class_metrics=class_metrics,
            **kwargs,
        )

    def update(  # type: ignore[override]
        self, preds: Sequence[dict[str, Tensor]], target: Sequence[dict[str, Tensor]]
    ) -> None:
        """Add one batch: ``preds`` and ``target`` are equally long lists of per-image dicts."""
        if not isinstance(preds, list | tuple) or not isinstance(target, list | tuple):
            raise UserTypeError(
                f"preds and target must be lists of dicts, got {type(preds).__name__} and "
                f"{type(target).__name__}"
            )
        if len(preds) != len(target):
            raise UserValueError(
                f"preds and target must have one entry per image, got {len(preds)} and "
                f"{len(target)}"
            )
        keep_pred = ("boxes", "scores", "labels")
        keep_target = ("boxes", "labels", "iscrowd", "area")
        clean_preds = [_pick(p, keep_pred, f"preds[{i}]") for i, p in enumerate(preds)]
        clean_target = [_pick(t, keep_target, f"target[{i}]") for i, t in enumerate(target)]
        super().update(clean_preds, clean_target)

    def compute(self) -> dict[str, Any]:  # type: ignore[override]
        """COCO metrics as plain Python numbers (see the class docstring for the keys)."""
        raw = super().compute()
        out: dict[str, Any] = {key: float(raw[key]) for key in DETECTION_KEYS}
        if self.class_metrics:
            out["map_per_class"] = [float(v) for v in raw["map_per_class"].reshape(-1)]
            out["classes"] = [int(c) for c in raw["classes"].reshape(-1)]
        return out


def _pick(item: object, keys: tuple[str, ...], name: str) -> dict[str, Tensor]:
    if not isinstance(item, dict):
        raise UserTypeError(f"{name} must be a dict, got {type(item).__name__}")
    return {k: item[k] for k in keys if k in item}


class SegmentationMetrics(Metric):
    """Semantic-segmentation mIoU, per-class IoU and pixel accuracy (Cityscapes-style).

    ``update(preds, target)``: ``preds`` are logits/scores ``[N, K, H, W]`` (float; the
    class is their argmax over K) or labels ``[N, H, W]`` (int); ``target`` is ``[N, H, W]``
    int with values in ``[0, K)`` or ``ignore_index``. Ignored pixels count nowhere.

    Accumulates the confusion matrix ``C[target, pred]`` over all updates (summed across
    processes under DDP); ``compute()`` returns

    - ``iou_per_class``: ``C[k,k] / (Σ_j C[k,j] + Σ_i C[i,k] − C[k,k])`` per class; NaN for a
      class absent from both the targets and the predictions of the whole evaluation;
    - ``miou``: mean of the per-class IoUs *excluding* those NaN classes (the usual
      Cityscapes / mmseg definition; a class that is predicted but absent from the targets
      has IoU 0 and counts);
    - ``pixel_acc``: correct / labelled pixels.

    All are NaN before any labelled pixel was seen.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    confmat: Tensor

    def __init__(self, num_classes: int, ignore_index: int | None = 255, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int):
            raise UserTypeError(f"num_classes must be an int, got {type(num_classes).__name__}")
        if num_classes < 2:
            raise UserValueError(f"num_classes must be >= 2, got {num_classes}")
        if ignore_index is not None and (
            isinstance(ignore_index, bool) or not isinstance(ignore_index, int)
        ):
            raise UserTypeError(f"ignore_index must be an int or None, got {ignore_index!r}")
        if ignore_index is not None and 0 <= ignore_index < num_classes:
            raise UserValueError(
                f"ignore_index={ignore_index} is a valid class for num_classes={num_classes}"
            )
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.add_state(
            "confmat",
            default=torch.zeros(num_classes, num_classes, dtype=torch.long),
            dist_reduce_fx="sum",
        )

    def update(self, preds: Tensor, target: Tensor) -> None:  # type: ignore[override]
        """Add a batch: preds ``[N, K, H, W]`` float or ``[N, H, W]`` int, target ``[N, H, W]``."""
        if not isinstance(preds, Tensor) or not isinstance(target, Tensor):
            raise UserTypeError(
                f"preds and target must be tensors, got {type(preds).__name__} and "
                f"{type(target).__name__}"
            )
        if target.dim() != 3 or target.is_floating_point():
            raise UserValueError(
                f"target must be an integer [N, H, W] tensor, got shape {tuple(target.shape)} "
                f"dtype {target.dtype}"
            )
        if preds.dim() == 4:
            if not preds.is_floating_point():
                raise UserTypeError(f"[N, K, H, W] preds must be float scores, got {preds.dtype}")
            if preds.shape[1] != self.num_classes:
                raise UserValueError(
                    f"preds have {preds.shape[1]} channels but num_classes={self.num_classes} "
                    f"(shape {tuple(preds.shape)})"
                )
            preds = preds.argmax(dim=1)
        elif preds.dim() != 3 or preds.is_floating_point():
            raise UserValueError(
                f"preds must be float [N, K, H, W] or integer [N, H, W], got shape "
                f"{tuple(preds.shape)} dtype {preds.dtype}"
            )
        if preds.shape != target.shape:
            raise UserValueError(
                f"preds {tuple(preds.shape)} and target {tuple(target.shape)} must cover the "
                f"same pixels"
            )
        self._check_range(preds, "preds", allow_ignore=False)
        self._check_range(target, "target", allow_ignore=True)
        self.confmat += multiclass_confusion_matrix(
            preds, target, self.num_classes, ignore_index=self.ignore_index, validate_args=False
        )

    def _check_range(self, labels: Tensor, name: str, allow_ignore: bool) -> None:
        if allow_ignore and self.ignore_index is not None:
            labels = labels[labels != self.ignore_index]
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            extra = f" or ignore_index={self.ignore_index}" if allow_ignore else ""
            raise UserValueError(
                f"{name} values must lie in [0, {self.num_classes - 1}]{extra}, found "
                f"{int(labels.min())}..{int(labels.max())}"
            )

    def compute(self) -> dict[str, Any]:  # type: ignore[override]
        """``{"miou": float, "iou_per_class": list[float], "pixel_acc": float}``."""
        cm = self.confmat.double()
        tp = cm.diagonal()
        union = cm.sum(0) + cm.sum(1) - tp
        iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, math.nan))
        total = cm.sum()
        return {
            "miou": float(iou.nanmean()) if bool((union > 0).any()) else math.nan,
            "iou_per_class": [float(v) for v in iou],
            "pixel_acc": float(tp.sum() / total) if total > 0 else math.nan,
        }
