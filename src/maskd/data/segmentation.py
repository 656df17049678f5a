"""Semantic segmentation datasets: Cityscapes, Pascal VOC and a generic PNG folder.

All yield `(image float32 [3, H, W] ImageNet-normalised, mask int64 [H, W])` with class
indices 0..num_classes-1 and 255 for unlabelled pixels (`ignore_index`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from maskd.data.files import (
    IMAGE_SUFFIXES,
    BadSampleError,
    read_label_png,
    read_rgb,
    require_dir,
    require_file,
)
from maskd.data.skipping import SkipBadSamples
from maskd.data.transforms import IGNORE_INDEX, finalize_segmentation
from maskd.errors import UserValueError

Transform = Callable[..., Any]

# Cityscapes labelIds → trainIds (the 19 evaluated classes); everything else is ignored.
CITYSCAPES_TRAIN_IDS: dict[int, int] = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
    23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip
CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
    "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car", "truck",
    "bus", "train", "motorcycle", "bicycle",
)  # fmt: skip
VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip


def cityscapes_lut() -> np.ndarray:
    """uint8 [256] lookup table labelId → trainId (255 where not evaluated)."""
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for label_id, train_id in CITYSCAPES_TRAIN_IDS.items():
        lut[label_id] = train_id
    return lut


class SegmentationFiles(SkipBadSamples, Dataset):
    """Base for datasets made of (image file, mask file) pairs.

    Subclasses fill `samples`, `num_classes`, `class_names` and may override
    `_read_mask` (e.g. to remap ids). `transforms(image, mask)` receives a
    `tv_tensors.Image` uint8 [3, H, W] and a `tv_tensors.Mask` uint8 [H, W].
    """

    ignore_index = IGNORE_INDEX

    def __init__(
        self,
        samples: list[tuple[Path, Path]],
        num_classes: int,
        class_names: list[str],
        transforms: Transform | None,
    ) -> None:
        # subclasses call `_init_skipping` first: collecting samples may already skip some
        self.samples = samples
        self.num_classes = num_classes
        self.class_names = class_names
        self.transforms = transforms

    def __len__(self) -> int:
        return len(self.samples)

    def summary(self) -> str:
        """One line: image/mask pairs and skipped samples."""
        return f"{len(self.samples)} image/mask pairs, {self.num_classes} classes, " + (
            f"{self.skipped} samples skipped"
        )

    def check_usable(self) -> None:
        """Raise ``ValueError`` when no mask holds a labelled pixel (reads masks until one does)."""
        for _, mask_path in self.samples:
            try:
                mask = self._read_mask(mask_path)
            except BadSampleError:
                continue
            if ((mask != self.ignore_index) & (mask < self.num_classes)).any():
                return
        raise UserValueError(
            f"no labelled pixel in any of the {len(self.samples)} masks (every pixel is the "
            f"ignore index {self.ignore_index} or out of range 0..{self.num_classes - 1}); "
            f"first mask: {self.samples[0][1] if self.samples else 'none'}"
        )

    def _describe(self, index: int) -> str:
        image_path, mask_path = self.samples[index]
        return f"{image_path} / {mask_path}"

    def _read_mask(self, path: Path) -> np.ndarray:
        return read_label_png(path)

    def _load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image_path, mask_path = self.samples[index]
        pixels = read_rgb(image_path)
        mask = self._read_mask(mask_path)
        if mask.shape != pixels.shape[:2]:
            raise BadSampleError(
                f"mask {mask_path} is {mask.shape[0]}x{mask.shape[1]} but image {image_path} "
                f"is {pixels.shape[0]}x{pixels.shape[1]}"
            )
        bad = (mask >= self.num_classes) & (mask != self.ignore_index)
        if bad.any():
            values = sorted({int(v) for v in np.unique(mask[bad])})
            raise BadSampleError(
                f"mask {mask_path} holds values {values[:10]} outside 0..{self.num_classes - 1} "
                f"and not the ignore index {self.ignore_index}"
            )
        image = tv_tensors.Image(torch.from_numpy(pixels).permute(2, 0, 1).contiguous())
        target = tv_tensors.Mask(torch.from_numpy(mask))
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return finalize_segmentation(image, target)

    def _pair_up(self, pairs: list[tuple[Path, Path]], where: Path) -> list[tuple[Path, Path]]:
        """Keep pairs whose mask exists; a missing mask raises unless skip_bad."""
        kept = []
        for image_path, mask_path in pairs:
            if mask_path.is_file():
                kept.append((image_path, mask_path))
            elif self.skip_bad:
                self._record_skip(str(mask_path), "mask file not found")
            else:
                raise FileNotFoundError(f"mask not found: {mask_path} (for image {image_path})")
        if not kept:
            raise FileNotFoundError(f"no usable image/mask pairs under {where}")
        return kept


class CityscapesSegmentation(SegmentationFiles):
    """Cityscapes fine annotations, 19 train classes.

    Layout: `root/leftImg8bit/{split}/{city}/{name}_leftImg8bit.png` with masks at
    `root/gtFine/{split}/{city}/{name}_gtFine_labelIds.png`; labelIds are mapped to
    trainIds (`CITYSCAPES_TRAIN_IDS`), every other id to 255.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        transforms: Transform | None = None,
        skip_bad: bool = False,
    ) -> None:
        self._init_skipping(skip_bad)
        root = Path(root)
        image_root = require_dir(root / "leftImg8bit" / split, "Cityscapes image")
        images = sorted(image_root.glob("*/*_leftImg8bit.png"))
        if not images:
            raise FileNotFoundError(f"no */*_leftImg8bit.png images under {image_root}")
        pairs = []
        for path in images:
            stem = path.name[: -len("_leftImg8bit.png")]
            mask = root / "gtFine" / split / path.parent.name / f"{stem}_gtFine_labelIds.png"
            pairs.append((path, mask))
        super().__init__(self._pair_up(pairs, root), 19, list(CITYSCAPES_CLASSES), transforms)
        self._lut = cityscapes_lut()

    def _read_mask(self, path: Path) -> np.ndarray:
        return self._lut[read_label_png(path)]


def _voc_root(root: Path) -> Path:
    for candidate in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if (candidate / "JPEGImages").is_dir():
            return candidate
    raise FileNotFoundError(
        f"no Pascal VOC folder under {root}: expected {root}/VOCdevkit/VOC2012/JPEGImages "
        "(or root pointing at VOC2012 itself)"
    )


class VOCSegmentation(SegmentationFiles):
    """Pascal VOC 2012 segmentation, 21 classes (background + 20), 255 on object borders.

    Layout: `root/VOCdevkit/VOC2012/` (or `root` = that folder) with
    `ImageSets/Segmentation/{split}.txt` (one id per line), `JPEGImages/{id}.jpg` and
    `{mask_dir}/{id}.png` palette PNGs whose indices are the classes
    (`mask_dir="SegmentationClassAug"` reads the SBD-augmented masks).
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        transforms: Transform | None = None,
        skip_bad: bool = False,
        mask_dir: str = "SegmentationClass",
    ) -> None:
        self._init_skipping(skip_bad)
        base = _voc_root(Path(root))
        split_file = require_file(
            base / "ImageSets" / "Segmentation" / f"{split}.txt", "VOC split file"
        )
        ids = [line.strip() for line in split_file.read_text().splitlines() if line.strip()]
        if not ids:
            raise UserValueError(f"VOC split file {split_file} lists no images")
        pairs = []
        for ident in ids:
            image = base / "JPEGImages" / f"{ident}.jpg"
            if not image.is_file():
                if skip_bad:
                    self._record_skip(str(image), "image file not found")
                    continue
                raise FileNotFoundError(f"image not found: {image} (listed in {split_file})")
            pairs.append((image, base / mask_dir / f"{ident}.png"))
        super().__init__(self._pair_up(pairs, base), 21, list(VOC_CLASSES), transforms)


def read_class_names(path: Path) -> list[str]:
    """`classes.txt`: one class name per line, line i naming class index i."""
    names = [line.strip() for line in require_file(path, "class list").read_text().splitlines()]
    names = [n for n in names if n]
    if not names:
        raise UserValueError(f"class list {path} is empty")
    if len(names) >= IGNORE_INDEX:
        raise UserValueError(f"class list {path} has {len(names)} classes; at most 254 fit a PNG")
    return names


class FolderSegmentation(SegmentationFiles):
    """Generic folder of images and PNG masks.

    Layout:
        root/classes.txt                   one class name per line (line i = class i)
        root/{split}/images/{stem}.png|jpg RGB images
        root/{split}/masks/{stem}.png      single-channel (L or palette) PNG, same size,
                                           pixel = class index, 255 = ignore

    `num_classes` may be given instead of `classes.txt`; when both exist they must agree.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        transforms: Transform | None = None,
        skip_bad: bool = False,
        num_classes: int | None = None,
    ) -> None:
        self._init_skipping(skip_bad)
        root = Path(root)
        classes_file = root / "classes.txt"
        if classes_file.is_file():
            names = read_class_names(classes_file)
            if num_classes is not None and num_classes != len(names):
                raise UserValueError(
                    f"num_classes={num_classes} but {classes_file} lists {len(names)} classes"
                )
        elif num_classes is None:
            raise UserValueError(f"no class list at {classes_file}; pass num_classes= or write one")
        else:
            if not 0 < num_classes < IGNORE_INDEX:
                raise UserValueError(f"num_classes must be in 1..254, got {num_classes}")
            names = [f"class_{i}" for i in range(num_classes)]
        image_dir = require_dir(root / split / "images", "image")
        mask_dir = require_dir(root / split / "masks", "mask")
        images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise FileNotFoundError(f"no .png/.jpg images in {image_dir}")
        stems = [p.stem for p in images]
        if len(set(stems)) != len(stems):
            dup = next(s for s in stems if stems.count(s) > 1)
            raise UserValueError(f"{image_dir} holds several images named {dup!r} (one per stem)")
        pairs = [(p, mask_dir / f"{p.stem}.png") for p in images]
        super().__init__(self._pair_up(pairs, root / split), len(names), names, transforms)
