"""COCO-format detection loader on small fixtures written here."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from maskd.data import CocoDetection, build_dataset, build_transforms, detection_collate


def _write_png(path: Path, h: int, w: int, seed: int) -> np.ndarray:
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return pixels


def _coco(root: Path, split: str = "val") -> dict:
    """Three images (ids 10, 20, 30), categories with non-contiguous ids 3 and 7."""
    pixels = {
        10: _write_png(root / split / "a.png", 40, 50, 0),
        20: _write_png(root / split / "b.png", 30, 30, 1),
        30: _write_png(root / split / "c.png", 20, 25, 2),
    }
    data = {
        "images": [
            {"id": 10, "file_name": "a.png", "width": 50, "height": 40},
            {"id": 20, "file_name": "b.png", "width": 30, "height": 30},
            {"id": 30, "file_name": "c.png", "width": 25, "height": 20},
        ],
        "categories": [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}],
        "annotations": [
            {"id": 1, "image_id": 10, "category_id": 3, "bbox": [1, 2, 10, 20], "iscrowd": 0},
            {"id": 2, "image_id": 10, "category_id": 7, "bbox": [40, 30, 20, 20], "iscrowd": 0},
            {"id": 3, "image_id": 10, "category_id": 7, "bbox": [5, 5, 0, 10], "iscrowd": 0},
            {"id": 4, "image_id": 10, "category_id": 3, "bbox": [60, 5, 5, 5], "iscrowd": 0},
            {"id": 5, "image_id": 10, "category_id": 3, "bbox": [0, 0, 30, 30], "iscrowd": 1},
            {"id": 6, "image_id": 20, "category_id": 7, "bbox": [-4, 3, 10, 5.5]},
        ],
    }
    ann = root / "annotations" / f"instances_{split}.json"
    ann.parent.mkdir(parents=True, exist_ok=True)
    ann.write_text(json.dumps(data))
    return {"ann": ann, "pixels": pixels, "data": data}


def test_targets_labels_and_counts(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    fx = _coco(tmp_path)
    with caplog.at_level(logging.INFO, logger="maskd.data"):
        ds = CocoDetection(tmp_path / "val", fx["ann"])
    assert len([r for r in caplog.records if "boxes kept" in r.getMessage()]) == 1
    assert ds.num_classes == 2 and ds.class_names == ["cat", "dog"]
    assert ds.cat_id_to_label == {3: 1, 7: 2} and ds.label_to_cat_id == {1: 3, 2: 7}
    assert len(ds) == 3 and ds.ids == [10, 20, 30]

    image, target = ds[0]
    assert image.dtype == torch.float32 and image.shape == (3, 40, 50)
    assert torch.allclose(image, torch.from_numpy(fx["pixels"][10]).permute(2, 0, 1) / 255.0)
    # ann 1 kept as xyxy; ann 2 clipped to the 50x40 image; 3 zero width, 4 outside, 5 crowd
    assert target["boxes"].tolist() == [[1, 2, 11, 22], [40, 30, 50, 40]]
    assert target["boxes"].dtype == torch.float32
    assert target["labels"].tolist() == [1, 2] and target["labels"].dtype == torch.int64
    assert target["image_id"] == 10 and target["orig_size"] == (40, 50)
    assert "iscrowd" not in target

    _, t20 = ds[1]
    assert t20["boxes"].tolist() == [[0.0, 3.0, 6.0, 8.5]] and t20["labels"].tolist() == [2]
    _, t30 = ds[2]  # no annotations: kept, with empty targets
    assert t30["boxes"].shape == (0, 4) and t30["labels"].shape == (0,)

    s = ds.box_stats
    assert (s["boxes_kept"], s["clipped"], s["dropped_degenerate"], s["dropped_outside"]) == (
        3,
        2,
        1,
        1,
    )
    assert s["crowd_ignored"] == 1 and s["images_without_boxes"] == 1


def test_include_crowd_marks_crowd_boxes(tmp_path: Path) -> None:
    fx = _coco(tmp_path)
    ds = CocoDetection(tmp_path / "val", fx["ann"], include_crowd=True)
    _, target = ds[0]
    assert target["boxes"].tolist()[-1] == [0, 0, 30, 30]
    assert target["iscrowd"].tolist() == [0, 0, 1]
    assert ds.box_stats["crowd_ignored"] == 0


def test_flip_transform_and_loader(tmp_path: Path) -> None:
    fx = _coco(tmp_path)
    tf = build_transforms("detection", train=True, hflip=1.0)
    ds = CocoDetection(tmp_path / "val", fx["ann"], transforms=tf)
    image, target = ds[0]
    assert torch.allclose(image, torch.from_numpy(fx["pixels"][10]).permute(2, 0, 1).flip(-1) / 255)
    assert target["boxes"].tolist() == [[50 - 11, 2, 50 - 1, 22], [0, 30, 10, 40]]
    images, targets = next(iter(DataLoader(ds, batch_size=3, collate_fn=detection_collate)))
    assert [im.shape[-2:] for im in images] == [(40, 50), (30, 30), (20, 25)]
    assert [t["image_id"] for t in targets] == [10, 20, 30]


def test_build_dataset_layout_and_overrides(tmp_path: Path) -> None:
    fx = _coco(tmp_path, split="train2017")
    ds = build_dataset("coco", tmp_path, "train2017")
    assert len(ds) == 3 and ds.num_classes == 2
    moved = tmp_path / "elsewhere.json"
    fx["ann"].rename(moved)
    with pytest.raises(FileNotFoundError, match="instances_train2017.json"):
        build_dataset("coco", tmp_path, "train2017")
    ds = build_dataset("coco", tmp_path, "x", image_dir="train2017", ann_file=moved)
    assert len(ds) == 3
    with pytest.raises(ValueError, match="num_classes=5"):
        build_dataset("coco", tmp_path, "x", image_dir="train2017", ann_file=moved, num_classes=5)
    with pytest.raises(ValueError, match="unknown dataset kind"):
        build_dataset("kitti", tmp_path, "train")


def test_to_coco_results_inverts_the_mapping(tmp_path: Path) -> None:
    fx = _coco(tmp_path)
    ds = CocoDetection(tmp_path / "val", fx["ann"])
    res = ds.to_coco_results(
        10, torch.tensor([[1.0, 2.0, 11.0, 22.0]]), torch.tensor([0.5]), torch.tensor([2])
    )
    assert res == [{"image_id": 10, "category_id": 7, "bbox": [1.0, 2.0, 10.0, 20.0], "score": 0.5}]
    with pytest.raises(ValueError, match="label 3"):
        ds.to_coco_results(10, torch.zeros(1, 4), torch.ones(1), torch.tensor([3]))


def test_missing_image(tmp_path: Path) -> None:
    fx = _coco(tmp_path)
    (tmp_path / "val" / "b.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"b\.png"):
        CocoDetection(tmp_path / "val", fx["ann"])
    ds = CocoDetection(tmp_path / "val", fx["ann"], skip_bad=True)
    assert ds.ids == [10, 30] and ds.skipped == 1
    assert ds.skipped_paths == [str(tmp_path / "val" / "b.png")]


@pytest.mark.parametrize("payload", [b"not an image at all", b""])
def test_corrupt_image(tmp_path: Path, payload: bytes) -> None:
    fx = _coco(tmp_path)
    bad = tmp_path / "val" / "a.png"
    bad.write_bytes(payload)
    ds = CocoDetection(tmp_path / "val", fx["ann"])
    with pytest.raises(ValueError, match=r"a\.png"):
        ds[0]
    ds = CocoDetection(tmp_path / "val", fx["ann"], skip_bad=True)
    _, target = ds[0]  # replaced by the next good sample
    assert target["image_id"] == 20
    assert ds.skipped == 1 and str(bad) in ds.skipped_paths[0]
    ds[0]
    assert ds.skipped == 1  # counted once


def test_truncated_image(tmp_path: Path) -> None:
    fx = _coco(tmp_path)
    path = tmp_path / "val" / "a.png"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match=r"a\.png"):
        CocoDetection(tmp_path / "val", fx["ann"])[0]


def test_image_size_disagreeing_with_json(tmp_path: Path) -> None:
    fx = _coco(tmp_path)
    _write_png(tmp_path / "val" / "a.png", 41, 50, 0)
    with pytest.raises(ValueError, match=r"a\.png is 41x50"):
        CocoDetection(tmp_path / "val", fx["ann"])[0]


def test_all_bad_raises(tmp_path: Path) -> None:
    fx = _coco(tmp_path)
    for name in ("a.png", "b.png", "c.png"):
        (tmp_path / "val" / name).write_bytes(b"junk")
    ds = CocoDetection(tmp_path / "val", fx["ann"], skip_bad=True)
    with pytest.raises(RuntimeError, match="all 3 samples"):
        ds[0]


def test_invalid_json_and_missing_files(tmp_path: Path) -> None:
    fx = _coco(tmp_path)
    fx["ann"].write_text('{"images": [')
    with pytest.raises(ValueError, match=r"instances_val\.json is not valid JSON"):
        CocoDetection(tmp_path / "val", fx["ann"])
    with pytest.raises(FileNotFoundError, match="nope.json"):
        CocoDetection(tmp_path / "val", tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match="missing_dir"):
        CocoDetection(tmp_path / "missing_dir", fx["ann"])


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.pop("categories"), "no 'categories' list"),
        (lambda d: d["annotations"][0].update(bbox=[1, 2, 3]), "annotation 1 has bbox"),
        (lambda d: d["annotations"][1].update(bbox=[1, 2, "x", 4]), "annotation 2 has bbox"),
        (lambda d: d["annotations"][0].update(category_id=99), "unknown category_id 99"),
        (lambda d: d["annotations"][0].update(image_id=99), "unknown image_id 99"),
        (lambda d: d["images"][0].pop("width"), "lacks"),
        (lambda d: d.update(categories=[]), "no categories"),
    ],
)
def test_invalid_annotations_name_the_file(tmp_path: Path, edit, message: str) -> None:
    fx = _coco(tmp_path)
    data = fx["data"]
    edit(data)
    fx["ann"].write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message) as info:
        CocoDetection(tmp_path / "val", fx["ann"], skip_bad=True)
    assert str(fx["ann"]) in str(info.value)


def test_json_without_annotations_key(tmp_path: Path) -> None:
    fx = _coco(tmp_path)
    data = fx["data"]
    data.pop("annotations")
    fx["ann"].write_text(json.dumps(data))
    ds = CocoDetection(tmp_path / "val", fx["ann"])
    assert len(ds) == 3 and all(ds[i][1]["boxes"].shape == (0, 4) for i in range(3))


def test_image_sizes_come_from_the_annotation_file(tmp_path: Path, monkeypatch) -> None:
    fx = _coco(tmp_path)
    (tmp_path / "val" / "b.png").unlink()  # a missing image is left out, its size too
    ds = CocoDetection(tmp_path / "val", fx["ann"], skip_bad=True)

    def no_reading(*args, **kwargs):
        raise AssertionError("an image was opened")

    monkeypatch.setattr("maskd.data.coco.read_rgb", no_reading)
    assert ds.image_sizes() == [(40, 50), (20, 25)]  # ids 10 and 30, as in the JSON


def test_aspect_ratio_group_factor_groups_the_training_batches(tmp_path: Path) -> None:
    from maskd.engine.config import DataArgs
    from maskd.engine.jobs import ConfigError, build_data

    _coco(tmp_path, "val")
    args = {"kind": "coco", "root": str(tmp_path), "train_split": "val", "val_split": "val"}
    dm, _ = build_data(DataArgs(**args, batch_size=2), "detection", seed=0)
    assert dm.group_ids is None
    dm, _ = build_data(
        DataArgs(**args, batch_size=2, aspect_ratio_group_factor=0), "detection", seed=0
    )
    # (h, w) = (40, 50), (30, 30), (20, 25): landscape, square, landscape
    assert dm.group_ids == [0, 1, 0]
    batches = [[t["image_id"] for t in targets] for _, targets in dm.train_dataloader()]
    assert len(batches) == 1 and sorted(batches[0]) == [10, 30]
    dm, _ = build_data(
        DataArgs(**args, limit_train=2, aspect_ratio_group_factor=3), "detection", seed=0
    )
    # a Subset: the first two images, h / w = 0.8 (edges 2 ** (i / 3 - 1): 3 below) and 1
    assert dm.group_ids == [3, 4]
    with pytest.raises(ValueError, match=r"aspect_ratio_group_factor \(-1 or null: off\)"):
        DataArgs(**args, aspect_ratio_group_factor=-2)
    with pytest.raises(TypeError, match="must be an integer"):
        DataArgs(**args, aspect_ratio_group_factor=1.5)  # type: ignore[arg-type]
    assert DataArgs(**args, aspect_ratio_group_factor=-1).aspect_ratio_group_factor == -1
    assert isinstance(ConfigError("x"), ValueError)
