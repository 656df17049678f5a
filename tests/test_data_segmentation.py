"""Cityscapes, VOC and folder segmentation loaders on small fixtures written here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from maskd.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CityscapesSegmentation,
    FolderSegmentation,
    VOCSegmentation,
    build_dataset,
    build_transforms,
)

# the 19 Cityscapes train classes, listed independently of the library's table
TRAIN_LABEL_IDS = [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]


def _normalised(pixels: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(pixels).permute(2, 0, 1).float() / 255.0
    return (x - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(
        3, 1, 1
    )


def _rgb(path: Path, h: int, w: int, seed: int, fmt: str = "PNG") -> np.ndarray:
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format=fmt, quality=100)
    if fmt == "JPEG":
        pixels = np.array(Image.open(path).convert("RGB"))
    return pixels


def _label_png(path: Path, labels: np.ndarray, palette: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(labels.astype(np.uint8))
    if palette:
        img.putpalette([(i * 37) % 256 for i in range(768)])
        assert img.mode == "P"
    img.save(path)


# ----- Cityscapes


def _cityscapes(root: Path) -> dict:
    rng = np.random.default_rng(0)
    out = {}
    for city, name in [("aachen", "aachen_000000_000019"), ("bonn", "bonn_000001_000019")]:
        pixels = _rgb(root / "leftImg8bit" / "train" / city / f"{name}_leftImg8bit.png", 12, 20, 1)
        label_ids = rng.integers(0, 34, (12, 20)).astype(np.uint8)
        label_ids[0, :5] = [7, 33, 0, 34, 255]
        _label_png(root / "gtFine" / "train" / city / f"{name}_gtFine_labelIds.png", label_ids)
        out[name] = (pixels, label_ids)
    return out


def test_cityscapes_maps_label_ids_to_train_ids(tmp_path: Path) -> None:
    fx = _cityscapes(tmp_path)
    ds = CityscapesSegmentation(tmp_path, "train")
    assert len(ds) == 2 and ds.num_classes == 19 and ds.class_names[13] == "car"
    pixels, label_ids = fx["aachen_000000_000019"]
    image, mask = ds[0]
    expected = np.full_like(label_ids, 255, dtype=np.int64)
    for train_id, label_id in enumerate(TRAIN_LABEL_IDS):
        expected[label_ids == label_id] = train_id
    assert mask.dtype == torch.int64 and torch.equal(mask, torch.from_numpy(expected))
    assert mask[0, :5].tolist() == [0, 18, 255, 255, 255]
    assert image.dtype == torch.float32
    assert torch.allclose(image, _normalised(pixels), atol=1e-5)


def test_cityscapes_missing_mask_and_empty_split(tmp_path: Path) -> None:
    _cityscapes(tmp_path)
    gt = tmp_path / "gtFine/train/bonn/bonn_000001_000019_gtFine_labelIds.png"
    gt.unlink()
    with pytest.raises(FileNotFoundError, match="bonn_000001_000019_gtFine_labelIds"):
        CityscapesSegmentation(tmp_path, "train")
    ds = CityscapesSegmentation(tmp_path, "train", skip_bad=True)
    assert len(ds) == 1 and ds.skipped == 1 and ds.skipped_paths == [str(gt)]
    with pytest.raises(FileNotFoundError, match="leftImg8bit/val"):
        CityscapesSegmentation(tmp_path, "val")


# ----- Pascal VOC


def _voc(root: Path) -> dict:
    base = root / "VOCdevkit" / "VOC2012"
    rng = np.random.default_rng(2)
    out = {}
    for ident in ("2007_000032", "2007_000039"):
        pixels = _rgb(base / "JPEGImages" / f"{ident}.jpg", 16, 18, 3, fmt="JPEG")
        mask = rng.integers(0, 21, (16, 18)).astype(np.uint8)
        mask[0, :] = 255  # object borders are 255 in VOC
        _label_png(base / "SegmentationClass" / f"{ident}.png", mask, palette=True)
        out[ident] = (pixels, mask)
    (base / "ImageSets" / "Segmentation").mkdir(parents=True)
    (base / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000032\n2007_000039\n\n")
    return out


def test_voc_reads_palette_indices(tmp_path: Path) -> None:
    fx = _voc(tmp_path)
    ds = VOCSegmentation(tmp_path, "val")
    assert len(ds) == 2 and ds.num_classes == 21 and ds.class_names[15] == "person"
    pixels, mask = fx["2007_000039"]
    image, target = ds[1]
    assert torch.equal(target, torch.from_numpy(mask.astype(np.int64)))
    assert torch.allclose(image, _normalised(pixels), atol=1e-5)
    # root may also point at VOC2012 itself
    assert len(VOCSegmentation(tmp_path / "VOCdevkit" / "VOC2012", "val")) == 2


def test_voc_bad_cases(tmp_path: Path) -> None:
    _voc(tmp_path)
    base = tmp_path / "VOCdevkit" / "VOC2012"
    with pytest.raises(FileNotFoundError, match=r"Segmentation/train\.txt"):
        VOCSegmentation(tmp_path, "train")
    with pytest.raises(FileNotFoundError, match="no Pascal VOC folder"):
        VOCSegmentation(tmp_path / "nothing", "val")
    # a colour mask instead of class indices
    Image.new("RGB", (18, 16), (128, 0, 0)).save(base / "SegmentationClass" / "2007_000032.png")
    with pytest.raises(ValueError, match=r"2007_000032\.png has mode 'RGB'"):
        VOCSegmentation(tmp_path, "val")[0]
    # a class index past 20
    _label_png(base / "SegmentationClass" / "2007_000032.png", np.full((16, 18), 30), True)
    with pytest.raises(ValueError, match=r"holds values \[30\]"):
        VOCSegmentation(tmp_path, "val")[0]
    (base / "JPEGImages" / "2007_000039.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"2007_000039\.jpg"):
        VOCSegmentation(tmp_path, "val")


# ----- generic folder


def _folder(root: Path, split: str = "train", n: int = 3, classes: int = 4) -> dict:
    rng = np.random.default_rng(4)
    root.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("\n".join(f"c{i}" for i in range(classes)) + "\n")
    out = {}
    for i in range(n):
        fmt, ext = ("JPEG", "jpg") if i == 1 else ("PNG", "png")
        pixels = _rgb(root / split / "images" / f"s{i}.{ext}", 10, 14, i, fmt=fmt)
        mask = rng.integers(0, classes, (10, 14)).astype(np.uint8)
        mask[-1, -1] = 255
        _label_png(root / split / "masks" / f"s{i}.png", mask)
        out[f"s{i}"] = (pixels, mask)
    return out


def test_folder_reads_pairs_and_classes(tmp_path: Path) -> None:
    fx = _folder(tmp_path)
    ds = FolderSegmentation(tmp_path, "train")
    assert len(ds) == 3 and ds.num_classes == 4 and ds.class_names == ["c0", "c1", "c2", "c3"]
    for i in range(3):
        pixels, mask = fx[f"s{i}"]
        image, target = ds[i]
        assert torch.equal(target, torch.from_numpy(mask.astype(np.int64)))
        assert torch.allclose(image, _normalised(pixels), atol=1e-5)
    assert ds.samples[1][0].name == "s1.jpg"


def test_folder_num_classes_rules(tmp_path: Path) -> None:
    _folder(tmp_path)
    with pytest.raises(ValueError, match="lists 4 classes"):
        FolderSegmentation(tmp_path, "train", num_classes=3)
    (tmp_path / "classes.txt").unlink()
    with pytest.raises(ValueError, match=r"classes\.txt"):
        FolderSegmentation(tmp_path, "train")
    ds = FolderSegmentation(tmp_path, "train", num_classes=4)
    assert ds.class_names == ["class_0", "class_1", "class_2", "class_3"]
    ds = FolderSegmentation(tmp_path, "train", num_classes=2)
    with pytest.raises(ValueError, match=r"s0\.png holds values \[2, 3\]"):
        ds[0]


def test_folder_bad_files(tmp_path: Path) -> None:
    _folder(tmp_path)
    masks = tmp_path / "train" / "masks"
    kept = (masks / "s2.png").read_bytes()
    (masks / "s2.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"masks/s2\.png"):
        FolderSegmentation(tmp_path, "train")
    ds = FolderSegmentation(tmp_path, "train", skip_bad=True)
    assert len(ds) == 2 and ds.skipped == 1
    (masks / "s2.png").write_bytes(kept)

    (tmp_path / "train" / "images" / "s0.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(ValueError, match=r"s0\.png"):
        FolderSegmentation(tmp_path, "train")[0]
    ds = FolderSegmentation(tmp_path, "train", skip_bad=True)
    image, mask = ds[0]  # s0 is skipped: s1 comes back
    assert image.shape == (3, 10, 14) and ds.skipped == 1
    assert torch.equal(mask, ds[1][1])

    _label_png(masks / "s1.png", np.zeros((9, 14)))
    with pytest.raises(ValueError, match=r"s1\.png is 9x14 but image .*s1\.jpg is 10x14"):
        FolderSegmentation(tmp_path, "train")[1]
    with pytest.raises(FileNotFoundError, match="val/images"):
        FolderSegmentation(tmp_path, "val")


def test_build_dataset_kinds_and_batches(tmp_path: Path) -> None:
    _cityscapes(tmp_path / "cs")
    _voc(tmp_path / "voc")
    _folder(tmp_path / "folder", split="val")
    assert isinstance(build_dataset("cityscapes", tmp_path / "cs", "train"), CityscapesSegmentation)
    assert isinstance(build_dataset("voc", tmp_path / "voc", "val"), VOCSegmentation)
    tf = build_transforms("segmentation", train=True, size=8)
    ds = build_dataset("folder", tmp_path / "folder", "val", tf)
    images, masks = next(iter(DataLoader(ds, batch_size=3)))
    assert images.shape == (3, 3, 8, 8) and masks.shape == (3, 8, 8)
    assert masks.dtype == torch.int64
    assert set(masks.unique().tolist()) <= {0, 1, 2, 3, 255}
    with pytest.raises(ValueError, match="apply to 'coco'"):
        build_dataset("voc", tmp_path / "voc", "val", ann_file="x.json")
