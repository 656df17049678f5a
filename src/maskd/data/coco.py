"""COCO-format detection through pycocotools.

Targets follow torchvision's detection contract (see `docs/design.md`):
`boxes` float32 [K, 4] XYXY in pixels, `labels` int64 [K] in 1..num_classes
(0 is background), plus `image_id` (the COCO image id) and `orig_size` (H, W).

Annotation policy, applied once at construction and summarised in one log line
(`box_stats` holds the counts):
- crowd annotations (`iscrowd=1`) are left out of the target, since training on them
  hurts; COCO evaluation reads them from the annotation file itself. With
  `include_crowd=True` they are kept and marked in `target["iscrowd"]`;
- images without annotations are kept (their target has `boxes` of shape [0, 4]);
- boxes reaching outside the image are clipped to it; boxes with zero or negative
  width/height, before or after clipping, are dropped.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools.coco import COCO
from torch.utils.data import Dataset
from torchvision import tv_tensors

from maskd.data.files import BadSampleError, read_json, read_rgb, require_dir
from maskd.data.skipping import SkipBadSamples
from maskd.data.transforms import finalize_detection
from maskd.errors import UserValueError

logger = logging.getLogger("maskd.data")

Transform = Callable[..., Any]


def _load_annotations(ann_file: Path) -> dict[str, Any]:
    data = read_json(ann_file, "COCO annotation file")
    if not isinstance(data, dict):
        raise UserValueError(f"COCO annotation file {ann_file} must hold a JSON object")
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list):
            raise UserValueError(f"COCO annotation file {ann_file} has no '{key}' list")
    data.setdefault("annotations", [])
    if not isinstance(data["annotations"], list):
        raise UserValueError(f"COCO annotation file {ann_file}: 'annotations' must be a list")
    if not data["categories"]:
        raise UserValueError(f"COCO annotation file {ann_file} defines no categories")
    for entry in data["images"]:
        missing = [k for k in ("id", "file_name", "width", "height") if k not in entry]
        if missing:
            raise UserValueError(
                f"COCO annotation file {ann_file}: image entry {entry.get('id', entry)!r} "
                f"lacks {missing}"
            )
    for entry in data["categories"]:
        if "id" not in entry or "name" not in entry:
            raise UserValueError(
                f"COCO annotation file {ann_file}: category {entry!r} lacks id/name"
            )
    return data


def _check_annotations(ann_file: Path, anns: list[dict], image_ids: set, cat_ids: set) -> None:
    for ann in anns:
        ident = ann.get("id", "?")
        bbox = ann.get("bbox")
        if (
            not isinstance(bbox, list | tuple)
            or len(bbox) != 4
            or not all(isinstance(v, int | float) and math.isfinite(v) for v in bbox)
        ):
            raise UserValueError(
                f"COCO annotation file {ann_file}: annotation {ident} has bbox {bbox!r}; "
                "expected [x, y, width, height] of 4 finite numbers"
            )
        if ann.get("image_id") not in image_ids:
            raise UserValueError(
                f"COCO annotation file {ann_file}: annotation {ident} refers to unknown "
                f"image_id {ann.get('image_id')!r}"
            )
        if ann.get("category_id") not in cat_ids:
            raise UserValueError(
                f"COCO annotation file {ann_file}: annotation {ident} refers to unknown "
                f"category_id {ann.get('category_id')!r}"
            )


def _prepare_boxes(
    anns: list[dict], width: int, height: int, cat_to_label: dict[int, int], stats: Counter
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """COCO xywh → clipped xyxy; returns (boxes [K,4] f32, labels [K] i64, iscrowd [K] i64)."""
    if not anns:
        return np.zeros((0, 4), np.float32), np.zeros(0, np.int64), np.zeros(0, np.int64)
    xywh = np.asarray([a["bbox"] for a in anns], dtype=np.float64)
    labels = np.asarray([cat_to_label[a["category_id"]] for a in anns], dtype=np.int64)
    crowd = np.asarray([int(bool(a.get("iscrowd", 0))) for a in anns], dtype=np.int64)
    xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
    degenerate = (xywh[:, 2] <= 0) | (xywh[:, 3] <= 0)
    clipped = xyxy.copy()
    clipped[:, 0::2] = clipped[:, 0::2].clip(0, width)
    clipped[:, 1::2] = clipped[:, 1::2].clip(0, height)
    empty = (clipped[:, 2] <= clipped[:, 0]) | (clipped[:, 3] <= clipped[:, 1])
    outside = empty & ~degenerate
    was_clipped = ~empty & ~degenerate & np.any(clipped != xyxy, axis=1)
    keep = ~(degenerate | empty)
    stats["dropped_degenerate"] += int(degenerate.sum())
    stats["dropped_outside"] += int(outside.sum())
    stats["clipped"] += int(was_clipped.sum())
    return clipped[keep].astype(np.float32), labels[keep], crowd[keep]


class CocoDetection(SkipBadSamples, Dataset):
    """Detection dataset from a COCO-format JSON and a folder of images.

    Args:
        image_dir: folder the annotation's `file_name`s are relative to.
        ann_file: COCO-format JSON (`images`, `categories`, optional `annotations`).
        transforms: called as `transforms(image, target)` with a `tv_tensors.Image`
            (uint8 [3, H, W]) and `target["boxes"]` as `tv_tensors.BoundingBoxes`;
            e.g. `build_transforms("detection", train)`. None: no transform.
        skip_bad: images missing on disk are left out at construction, and images that
            fail to decode are replaced by the next good one, all counted in `skipped`;
            otherwise either raises with the file's path.
        include_crowd: keep crowd boxes in the target, marked by `target["iscrowd"]`.

    Yields `(image float32 [3, H, W] in [0, 1], target)`. Invalid JSON or annotations
    raise ValueError naming `ann_file`, whatever `skip_bad` says.
    """

    def __init__(
        self,
        image_dir: str | Path,
        ann_file: str | Path,
        transforms: Transform | None = None,
        skip_bad: bool = False,
        include_crowd: bool = False,
    ) -> None:
        self.image_dir = require_dir(Path(image_dir), "COCO image")
        self.ann_file = Path(ann_file)
        self.transforms = transforms
        self.include_crowd = include_crowd
        self._init_skipping(skip_bad)

        data = _load_annotations(self.ann_file)
        images = {img["id"]: img for img in data["images"]}
        if len(images) != len(data["images"]):
            raise UserValueError(f"COCO annotation file {self.ann_file} repeats image ids")
        cats = sorted(data["categories"], key=lambda c: c["id"])
        self.cat_id_to_label: dict[int, int] = {c["id"]: i + 1 for i, c in enumerate(cats)}
        self.label_to_cat_id: dict[int, int] = {v: k for k, v in self.cat_id_to_label.items()}
        self.class_names: list[str] = [str(c["name"]) for c in cats]
        self.num_classes = len(cats)
        _check_annotations(
            self.ann_file, data["annotations"], set(images), set(self.cat_id_to_label)
        )

        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            self.coco = COCO()
            self.coco.dataset = data
            self.coco.createIndex()

        self.box_stats: Counter = Counter()
        self._targets: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        for image_id in sorted(images):
            info = images[image_id]
            anns = self.coco.imgToAnns.get(image_id, [])
            if not include_crowd:
                crowd = [a for a in anns if a.get("iscrowd", 0)]
                self.box_stats["crowd_ignored"] += len(crowd)
                anns = [a for a in anns if not a.get("iscrowd", 0)]
            prepared = _prepare_boxes(
                anns, int(info["width"]), int(info["height"]), self.cat_id_to_label, self.box_stats
            )
            self.box_stats["boxes_kept"] += len(prepared[0])
            self.box_stats["images_without_boxes"] += int(len(prepared[0]) == 0)
            self._targets[image_id] = prepared

        self.ids: list[int] = []
        missing: list[Path] = []
        for image_id in sorted(images):
            path = self.image_dir / images[image_id]["file_name"]
            if path.is_file():
                self.ids.append(image_id)
            elif skip_bad:
                self._record_skip(str(path), "image file not found")
            else:
                missing.append(path)
        if missing:
            raise FileNotFoundError(
                f"image file not found: {missing[0]} ({len(missing)} of {len(images)} images "
                f"listed in {self.ann_file} are missing; pass skip_bad=True to leave them out)"
            )
        self._log_summary()

    def _log_summary(self) -> None:
        logger.info("%s: %s", self.ann_file, self.summary())

    def summary(self) -> str:
        """One line: images, boxes kept, clipped and dropped (and why), crowd, skipped."""
        s = self.box_stats
        dropped = s["dropped_degenerate"] + s["dropped_outside"]
        return (
            f"{len(self.ids)} images ({s['images_without_boxes']} without boxes), "
            f"{s['boxes_kept']} boxes kept ({s['clipped']} clipped to the image), {dropped} "
            f"dropped ({s['dropped_degenerate']} of zero or negative size, "
            f"{s['dropped_outside']} outside the image), {s['crowd_ignored']} crowd ignored, "
            f"{self.skipped} images skipped"
        )

    def check_usable(self) -> None:
        """Raise ``ValueError`` when no image has a box to learn from."""
        if self.box_stats["boxes_kept"] == 0:
            raise UserValueError(
                f"{self.ann_file} has no usable box: {self.summary()}; boxes need a positive "
                "width and height inside the image ([x, y, w, h] in pixels)"
            )

    def __len__(self) -> int:
        return len(self.ids)

    def image_path(self, index: int) -> Path:
        """Path of the image of sample `index`."""
        return self.image_dir / self.coco.imgs[self.ids[index]]["file_name"]

    def image_sizes(self) -> list[tuple[int, int]]:
        """``(height, width)`` of every sample, from the annotation file (no image is read)."""
        return [
            (int(self.coco.imgs[i]["height"]), int(self.coco.imgs[i]["width"])) for i in self.ids
        ]

    def _describe(self, index: int) -> str:
        return str(self.image_path(index))

    def _load(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        path = self.image_path(index)
        pixels = read_rgb(path)
        height, width = pixels.shape[:2]
        if (height, width) != (int(info["height"]), int(info["width"])):
            raise BadSampleError(
                f"image {path} is {height}x{width} (HxW) but {self.ann_file} says "
                f"{info['height']}x{info['width']}"
            )
        boxes, labels, crowd = self._targets[image_id]
        image = tv_tensors.Image(torch.from_numpy(pixels).permute(2, 0, 1).contiguous())
        target: dict[str, Any] = {
            "boxes": tv_tensors.BoundingBoxes(
                torch.from_numpy(boxes.copy()), format="XYXY", canvas_size=(height, width)
            ),
            "labels": torch.from_numpy(labels.copy()),
            "image_id": int(image_id),
            "orig_size": (height, width),
        }
        if self.include_crowd:
            target["iscrowd"] = torch.from_numpy(crowd.copy())
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return finalize_detection(image, target)

    def to_coco_results(
        self, image_id: int, boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor
    ) -> list[dict[str, Any]]:
        """One image's predictions (boxes [K,4] XYXY, scores [K], labels [K]) as COCO
        result entries `{image_id, category_id, bbox: [x, y, w, h], score}`."""
        out = []
        for box, score, label in zip(boxes.tolist(), scores.tolist(), labels.tolist(), strict=True):
            label = int(label)
            if label not in self.label_to_cat_id:
                raise UserValueError(f"label {label} is not in 1..{self.num_classes}")
            x1, y1, x2, y2 = box
            out.append(
                {
                    "image_id": int(image_id),
                    "category_id": self.label_to_cat_id[label],
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "score": float(score),
                }
            )
        return out
