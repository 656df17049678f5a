"""`build_dataset`: one entry point from a dataset kind and a folder to a Dataset."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from maskd.data.coco import CocoDetection
from maskd.data.segmentation import CityscapesSegmentation, FolderSegmentation, VOCSegmentation
from maskd.errors import UserValueError

# dataset kind → task it serves
KINDS: dict[str, str] = {
    "coco": "detection",
    "cityscapes": "segmentation",
    "voc": "segmentation",
    "folder": "segmentation",
}


def task_of(kind: str) -> str:
    """The task a dataset kind serves: "detection" or "segmentation"."""
    if kind not in KINDS:
        raise UserValueError(f"unknown dataset kind {kind!r}; expected one of {sorted(KINDS)}")
    return KINDS[kind]


def coco_paths(
    root: str | Path,
    split: str,
    image_dir: str | Path | None = None,
    ann_file: str | Path | None = None,
) -> tuple[Path, Path]:
    """(image folder, annotation file) in COCO's layout, each overridable.

    Defaults: `root/{split}` and `root/annotations/instances_{split}.json`; relative
    overrides are taken relative to `root`.
    """
    root = Path(root)
    images = root / (image_dir if image_dir is not None else split)
    ann = root / (ann_file if ann_file is not None else f"annotations/instances_{split}.json")
    return images, ann


def build_dataset(
    kind: str,
    root: str | Path,
    split: str,
    transforms: Callable[..., Any] | None = None,
    *,
    skip_bad: bool = False,
    image_dir: str | Path | None = None,
    ann_file: str | Path | None = None,
    num_classes: int | None = None,
    **kwargs: Any,
) -> Dataset:
    """Build a dataset of `kind` from the files under `root`.

    Kinds and expected layouts:
      - "coco" (detection): `root/{split}/` images and `root/annotations/instances_{split}.json`,
        as in COCO itself (`train2017/`, `annotations/instances_train2017.json`);
        `image_dir=` / `ann_file=` override either (relative to `root` or absolute).
        Extra keyword: `include_crowd`.
      - "cityscapes": `root/leftImg8bit/{split}/{city}/*_leftImg8bit.png` and
        `root/gtFine/{split}/{city}/*_gtFine_labelIds.png` (19 trainId classes).
      - "voc": `root/VOCdevkit/VOC2012/` with `JPEGImages/`, `SegmentationClass/`,
        `ImageSets/Segmentation/{split}.txt` (21 classes). Extra keyword: `mask_dir`.
      - "folder": `root/classes.txt`, `root/{split}/images/*.png|jpg`,
        `root/{split}/masks/*.png` (class indices, 255 ignore); `num_classes=` may
        replace `classes.txt`. `maskd.data.synth.generate(task="segmentation")` writes it.

    The result has `num_classes` and `class_names`; batch it with `collate_for(task_of(kind))`.
    """
    task_of(kind)
    dataset: Any
    if kind == "coco":
        images, ann = coco_paths(root, split, image_dir, ann_file)
        dataset = CocoDetection(images, ann, transforms=transforms, skip_bad=skip_bad, **kwargs)
    elif image_dir is not None or ann_file is not None:
        raise UserValueError(f"image_dir/ann_file apply to 'coco' datasets, not {kind!r}")
    elif kind == "cityscapes":
        dataset = CityscapesSegmentation(root, split, transforms, skip_bad=skip_bad, **kwargs)
    elif kind == "voc":
        dataset = VOCSegmentation(root, split, transforms, skip_bad=skip_bad, **kwargs)
    else:
        dataset = FolderSegmentation(
            root, split, transforms, skip_bad=skip_bad, num_classes=num_classes, **kwargs
        )
    if num_classes is not None and dataset.num_classes != num_classes:
        raise UserValueError(
            f"num_classes={num_classes} but the {kind} dataset at {root} has "
            f"{dataset.num_classes} classes"
        )
    return dataset
