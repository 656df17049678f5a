"""Metrics against independent computations: pycocotools' COCOeval run directly, and a
numpy confusion matrix."""

from __future__ import annotations

import contextlib
import io
import math

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchmetrics import Metric

from maskd.metrics import DetectionMetrics, SegmentationMetrics

# --- detection ----------------------------------------------------------------------------------


def _random_boxes(gen: torch.Generator, n: int, scale: float) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=gen) * 300
    wh = (0.2 + torch.rand(n, 2, generator=gen)) * scale
    return torch.cat([xy, xy + wh], dim=1)


def _detection_data(seed: int, num_images: int = 6):
    """Ground truth with small/medium/large boxes, a crowd box, an image without objects;
    predictions = jittered ground truth + false positives, one image without predictions."""
    gen = torch.Generator().manual_seed(seed)
    preds, targets = [], []
    for i in range(num_images):
        n = 0 if i == 1 else int(torch.randint(1, 6, (1,), generator=gen))
        # sizes cycle through COCO's small / medium / large ranges
        scales = [(20.0, 60.0, 150.0)[j % 3] for j in range(n)]
        boxes = torch.cat([_random_boxes(gen, 1, s) for s in scales] or [torch.zeros(0, 4)])
        labels = torch.randint(1, 4, (n,), generator=gen)
        target = {"boxes": boxes, "labels": labels}
        if i == 2 and n:
            target["iscrowd"] = torch.zeros(n, dtype=torch.long)
            target["iscrowd"][0] = 1
        if i == 3 and n:
            target["area"] = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) * 0.5
        targets.append(target)
        if i == 4:
            preds.append(
                {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": labels[:0]}
            )
            continue
        jitter = (torch.rand(n, 4, generator=gen) - 0.5) * 12
        fp = _random_boxes(gen, 3, 50.0)
        pred_boxes = torch.cat([boxes + jitter, fp])
        pred_labels = torch.cat([labels, torch.randint(1, 4, (3,), generator=gen)])
        # one mislabelled true positive
        if n:
            pred_labels[0] = pred_labels[0] % 3 + 1
        scores = torch.rand(n + 3, generator=gen)
        preds.append({"boxes": pred_boxes, "scores": scores, "labels": pred_labels})
    return preds, targets


def _xywh(box: list[float]) -> list[float]:
    return [box[0], box[1], box[2] - box[0], box[3] - box[1]]


def _cocoeval_stats(preds, targets) -> np.ndarray:
    """pycocotools run directly on the same data (COCO json built here)."""
    images, annotations, results = [], [], []
    categories = set()
    for image_id, (pred, target) in enumerate(zip(preds, targets, strict=True)):
        images.append({"id": image_id})
        crowd = target.get("iscrowd", torch.zeros(len(target["labels"]), dtype=torch.long))
        for k, (box, label) in enumerate(
            zip(target["boxes"].tolist(), target["labels"].tolist(), strict=True)
        ):
            bbox = _xywh(box)
            area = float(target["area"][k]) if "area" in target else bbox[2] * bbox[3]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": label,
                    "bbox": bbox,
                    "area": area,
                    "iscrowd": int(crowd[k]),
                }
            )
            categories.add(label)
        for box, score, label in zip(
            pred["boxes"].tolist(), pred["scores"].tolist(), pred["labels"].tolist(), strict=True
        ):
            results.append(
                {"image_id": image_id, "category_id": label, "bbox": _xywh(box), "score": score}
            )
            categories.add(label)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {
            "images": images,
            "annotations": annotations,
            "categories": [{"id": c} for c in sorted(categories)],
        }
        gt.createIndex()
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_detection_matches_cocoeval(seed):
    preds, targets = _detection_data(seed)
    metric = DetectionMetrics()
    metric.update(preds[:3], targets[:3])  # two batches: accumulation across updates
    metric.update(preds[3:], targets[3:])
    result = metric.compute()
    stats = _cocoeval_stats(preds, targets)
    keys = ["map", "map_50", "map_75", "map_small", "map_medium", "map_large"]
    expected = dict(zip(keys, stats[:6].tolist(), strict=True)) | {"mar_100": stats[8]}
    assert set(result) == set(expected)
    for key, value in expected.items():
        assert isinstance(result[key], float)
        # identical to COCOeval's numbers, which torchmetrics stores as float32
        assert result[key] == float(np.float32(value)), key
    assert 0 < result["map"] < 1  # the data are neither trivial nor hopeless


def test_detection_perfect_predictions_and_reset():
    _, targets = _detection_data(5)
    targets = [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets]
    preds = [
        {"boxes": t["boxes"], "labels": t["labels"], "scores": torch.ones(len(t["labels"]))}
        for t in targets
    ]
    metric = DetectionMetrics(class_metrics=True)
    metric.update(preds, targets)
    result = metric.compute()
    assert result["map"] == pytest.approx(1.0)
    assert result["classes"] == sorted({int(c) for t in targets for c in t["labels"]})
    assert result["map_per_class"] == pytest.approx([1.0] * len(result["classes"]))
    metric.reset()
    bad = [{**p, "scores": p["scores"] * 0.0} for p in preds]
    bad[0]["boxes"] = bad[0]["boxes"] + 500.0
    metric.update(bad, targets)
    assert metric.compute()["map"] < 1.0


def test_detection_bad_inputs():
    metric = DetectionMetrics()
    assert isinstance(metric, Metric)
    preds, targets = _detection_data(0, num_images=2)
    with pytest.raises(ValueError, match="one entry per image"):
        metric.update(preds, targets[:1])
    with pytest.raises(TypeError, match="lists of dicts"):
        metric.update(preds[0], targets[0])
    with pytest.raises(TypeError, match=r"target\[1\] must be a dict"):
        metric.update(preds, [targets[0], "x"])
    with pytest.raises(TypeError, match="backend"):
        DetectionMetrics(backend="faster_coco_eval")


def test_detection_extra_target_keys_are_ignored():
    preds, targets = _detection_data(3, num_images=3)
    with_extras = [{**t, "image_id": torch.tensor(i)} for i, t in enumerate(targets)]
    a, b = DetectionMetrics(), DetectionMetrics()
    a.update(preds, targets)
    b.update(preds, with_extras)
    assert a.compute() == b.compute()


# --- segmentation ---------------------------------------------------------------------------


def _numpy_reference(preds: np.ndarray, target: np.ndarray, k: int, ignore: int):
    valid = target != ignore
    cm = np.bincount(target[valid] * k + preds[valid], minlength=k * k).reshape(k, k)
    tp = np.diag(cm).astype(np.float64)
    union = cm.sum(0) + cm.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
    return np.nanmean(iou), iou, tp.sum() / cm.sum()


def _seg_batch(gen: torch.Generator, k: int, absent: int):
    logits = torch.randn(2, k, 16, 20, generator=gen)
    logits[:, absent] = -1e9  # never predicted
    target = torch.randint(0, k, (2, 16, 20), generator=gen)
    target[target == absent] = 0  # never in the ground truth either
    target[torch.rand(2, 16, 20, generator=gen) < 0.2] = 255
    # make predictions agree with the target on ~half the pixels
    agree = (torch.rand(2, 16, 20, generator=gen) < 0.5) & (target != 255)
    onehot = torch.nn.functional.one_hot(target.clamp(max=k - 1), k).permute(0, 3, 1, 2)
    logits = torch.where(agree.unsqueeze(1), onehot * 1e3 - 1e3, logits)
    return logits, target


@pytest.mark.parametrize("seed", [0, 1])
def test_segmentation_matches_numpy_confusion_matrix(seed):
    k, absent = 5, 3
    gen = torch.Generator().manual_seed(seed)
    batches = [_seg_batch(gen, k, absent) for _ in range(3)]
    metric = SegmentationMetrics(k, ignore_index=255)
    for i, (logits, target) in enumerate(batches):
        # logits for some batches, labels for others
        metric.update(logits if i % 2 == 0 else logits.argmax(1), target)
    result = metric.compute()
    preds = np.concatenate([b[0].argmax(1).numpy().ravel() for b in batches])
    target = np.concatenate([b[1].numpy().ravel() for b in batches])
    miou, iou, acc = _numpy_reference(preds, target, k, 255)
    assert math.isnan(result["iou_per_class"][absent])
    assert result["miou"] == pytest.approx(miou, rel=1e-12)
    np.testing.assert_allclose(result["iou_per_class"], iou, rtol=1e-12)
    assert result["pixel_acc"] == pytest.approx(acc, rel=1e-12)
    # the absent class is excluded from the mean, not counted as 0
    assert result["miou"] == pytest.approx(np.mean(np.delete(iou, absent)), rel=1e-12)


def test_segmentation_state_merges_like_ddp():
    """Two processes' states summed (what DDP sync does) give the single-process result."""
    k = 4
    gen = torch.Generator().manual_seed(7)
    (la, ta), (lb, tb) = _seg_batch(gen, k, 2), _seg_batch(gen, k, 2)
    single, left, right = (SegmentationMetrics(k) for _ in range(3))
    single.update(la, ta)
    single.update(lb, tb)
    left.update(la, ta)
    right.update(lb, tb)
    left.merge_state(right)
    assert left.compute()["miou"] == single.compute()["miou"]
    single.reset()
    assert int(single.confmat.sum()) == 0
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert math.isnan(single.compute()["miou"])


def test_segmentation_predicted_but_absent_class_counts_as_zero():
    metric = SegmentationMetrics(3, ignore_index=255)
    target = torch.tensor([[[0, 0, 1, 255]]])
    preds = torch.tensor([[[0, 2, 1, 2]]])  # the last pixel is ignored
    metric.update(preds, target)
    result = metric.compute()
    # class 0: tp 1, union 2; class 1: 1/1; class 2: predicted once on a class-0 pixel: 0/1
    assert result["iou_per_class"] == [0.5, 1.0, 0.0]
    assert result["miou"] == pytest.approx(0.5)
    assert result["pixel_acc"] == pytest.approx(2 / 3)


def test_segmentation_bad_inputs():
    with pytest.raises(ValueError, match="ignore_index"):
        SegmentationMetrics(5, ignore_index=2)
    with pytest.raises(TypeError, match="num_classes"):
        SegmentationMetrics(5.0)
    metric = SegmentationMetrics(5)
    target = torch.zeros(1, 4, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="6 channels"):
        metric.update(torch.zeros(1, 6, 4, 4), target)
    with pytest.raises(ValueError, match="same pixels"):
        metric.update(torch.zeros(1, 5, 4, 5), target)
    with pytest.raises(ValueError, match=r"target values .* found 0\.\.7"):
        metric.update(torch.zeros(1, 5, 4, 4), target + 7 * (torch.rand(1, 4, 4) > 0.5))
    with pytest.raises(ValueError, match="target must be an integer"):
        metric.update(torch.zeros(1, 5, 4, 4), target.float())
    with pytest.raises(ValueError, match="preds values"):
        metric.update(target + 9, target)
    with pytest.raises(TypeError, match="tensors"):
        metric.update([0], target)
