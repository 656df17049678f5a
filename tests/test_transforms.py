"""Joint transforms: boxes and masks must follow the image exactly."""

from __future__ import annotations

import pytest
import torch
from torchvision import tv_tensors

from maskd.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    RandomScale,
    build_transforms,
    collate_for,
    detection_collate,
)
from maskd.data.transforms import finalize_detection, finalize_segmentation


def _det_sample(h: int = 40, w: int = 60) -> tuple[tv_tensors.Image, dict]:
    g = torch.Generator().manual_seed(0)
    image = tv_tensors.Image(torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8))
    boxes = tv_tensors.BoundingBoxes(
        torch.tensor([[5.0, 4.0, 20.0, 30.0], [30.0, 10.0, 59.0, 39.0]]),
        format="XYXY",
        canvas_size=(h, w),
    )
    target = {"boxes": boxes, "labels": torch.tensor([1, 2]), "image_id": 7, "orig_size": (h, w)}
    return image, target


def test_horizontal_flip_mirrors_boxes_and_pixels() -> None:
    image, target = _det_sample()
    w = image.shape[-1]
    out_img, out_t = build_transforms("detection", train=True, hflip=1.0)(image, target)
    out_img, out_t = finalize_detection(out_img, out_t)
    x1, y1, x2, y2 = target["boxes"].as_subclass(torch.Tensor).unbind(1)
    expected = torch.stack([w - x2, y1, w - x1, y2], dim=1)
    assert torch.equal(out_t["boxes"], expected)
    assert torch.equal(out_t["labels"], torch.tensor([1, 2]))
    assert out_img.dtype == torch.float32
    assert torch.allclose(out_img, image.flip(-1).float() / 255.0)
    assert out_t["image_id"] == 7 and out_t["orig_size"] == (40, 60)


def test_eval_resize_scales_boxes() -> None:
    image, target = _det_sample(40, 60)
    out_img, out_t = build_transforms("detection", train=False, size=(80, 30))(image, target)
    assert out_img.shape == (3, 80, 30)
    sx, sy = 30 / 60, 80 / 40
    expected = target["boxes"].as_subclass(torch.Tensor) * torch.tensor([sx, sy, sx, sy])
    assert torch.allclose(out_t["boxes"].as_subclass(torch.Tensor), expected, atol=1e-4)


def test_scale_jitter_moves_boxes_with_the_image() -> None:
    torch.manual_seed(3)
    image, target = _det_sample(40, 60)
    tf = build_transforms("detection", train=True, size=64, scale_range=(0.5, 1.5), hflip=0.0)
    out_img, out_t = tf(image, target)
    fy, fx = out_img.shape[-2] / 40, out_img.shape[-1] / 60
    assert out_img.shape[-2:] != (40, 60)
    expected = target["boxes"].as_subclass(torch.Tensor) * torch.tensor([fx, fy, fx, fy])
    assert torch.allclose(out_t["boxes"].as_subclass(torch.Tensor), expected, atol=1e-3)


def test_degenerate_boxes_removed_with_their_labels() -> None:
    image, target = _det_sample()
    target["boxes"] = tv_tensors.BoundingBoxes(
        torch.tensor([[5.0, 4.0, 5.0, 30.0], [1.0, 1.0, 9.0, 9.0], [70.0, 5.0, 90.0, 9.0]]),
        format="XYXY",
        canvas_size=(40, 60),
    )
    target["labels"] = torch.tensor([3, 4, 5])
    target["iscrowd"] = torch.tensor([0, 1, 0])
    _, out = build_transforms("detection", train=False)(image, target)
    assert out["boxes"].as_subclass(torch.Tensor).tolist() == [[1.0, 1.0, 9.0, 9.0]]
    assert out["labels"].tolist() == [4]
    assert out["iscrowd"].tolist() == [1]


def _seg_sample(h: int = 30, w: int = 50) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
    g = torch.Generator().manual_seed(1)
    mask = torch.randint(0, 5, (h, w), generator=g, dtype=torch.uint8)
    # the image encodes its own mask, so any misalignment between them is visible
    image = (mask * 40 + 10).expand(3, h, w).clone()
    return tv_tensors.Image(image), tv_tensors.Mask(mask)


def _denorm_uint8(image: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((image * std + mean) * 255).round().to(torch.int64)


def test_segmentation_crop_pad_flip_keep_mask_aligned() -> None:
    torch.manual_seed(0)
    image, mask = _seg_sample(30, 50)
    tf = build_transforms("segmentation", train=True, size=(48, 40), scale_range=None, hflip=0.5)
    for _ in range(5):
        out_img, out_mask = finalize_segmentation(*tf(image, mask))
        assert out_img.shape == (3, 48, 40) and out_mask.shape == (48, 40)
        assert out_mask.dtype == torch.int64
        pixels = _denorm_uint8(out_img)[0]
        padded = out_mask == 255
        assert padded.any()  # 30 px high image in a 48 px crop: padding happened
        assert torch.equal(pixels[~padded], out_mask[~padded] * 40 + 10)
        assert torch.all(pixels[padded] == 0)


def test_random_scale_keeps_mask_aligned_and_values() -> None:
    torch.manual_seed(5)
    h, w = 40, 64
    mask = torch.zeros(h, w, dtype=torch.uint8)
    mask[:, 32:] = 3  # two wide regions: interpolation only touches the seam
    image = tv_tensors.Image((mask * 60 + 20).expand(3, h, w).clone())
    out_img, out_mask = RandomScale((1.5, 1.5))(image, tv_tensors.Mask(mask))
    assert out_img.shape[-2:] == (60, 96) and out_mask.shape == (60, 96)
    assert set(out_mask.unique().tolist()) == {0, 3}
    assert torch.equal(out_mask[:, :48], torch.zeros(60, 48, dtype=torch.uint8))
    assert torch.all(out_mask[:, 48:] == 3)
    pixels = out_img[0].to(torch.int64)
    away_from_seam = torch.ones(96, dtype=torch.bool)
    away_from_seam[45:51] = False
    expected = out_mask.to(torch.int64) * 60 + 20
    assert torch.equal(pixels[:, away_from_seam], expected[:, away_from_seam])


def test_segmentation_eval_normalises_like_imagenet() -> None:
    image, mask = _seg_sample()
    out_img, out_mask = finalize_segmentation(*build_transforms("segmentation", False)(image, mask))
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert torch.allclose(out_img, (image.float() / 255 - mean) / std, atol=1e-6)
    assert torch.equal(out_mask, mask.as_subclass(torch.Tensor).long())


def test_finalize_converts_uint8_from_custom_pipelines() -> None:
    image, mask = _seg_sample()
    out_img, _ = finalize_segmentation(image, mask)
    assert torch.allclose(_denorm_uint8(out_img), image.as_subclass(torch.Tensor).long())


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown task"):
        build_transforms("classification", True)
    with pytest.raises(ValueError, match="crop size"):
        build_transforms("segmentation", True)
    with pytest.raises(ValueError, match="target size"):
        build_transforms("detection", True, scale_range=(0.5, 2.0))
    with pytest.raises(ValueError, match="size must"):
        build_transforms("detection", False, size=(1, 2, 3))
    with pytest.raises(ValueError, match="scale_range"):
        RandomScale((2.0, 1.0))


def test_detection_collate_keeps_lists_in_order() -> None:
    batch = [(torch.zeros(3, 4, 5), {"image_id": 1}), (torch.ones(3, 6, 2), {"image_id": 2})]
    images, targets = detection_collate(batch)
    assert [im.shape for im in images] == [(3, 4, 5), (3, 6, 2)]
    assert [t["image_id"] for t in targets] == [1, 2]
    assert collate_for("detection") is detection_collate
    seg = collate_for("segmentation")(
        [(torch.zeros(3, 2, 2), torch.zeros(2, 2, dtype=torch.long))] * 3
    )
    assert seg[0].shape == (3, 3, 2, 2) and seg[1].shape == (3, 2, 2)


@pytest.mark.parametrize(
    ("task", "options", "named"),
    [
        ("detection", {"hfilp": 0.5}, "hflip"),
        ("segmentation", {"mean": [0.5] * 3, "crop": 3}, "scale_range"),
    ],
)
def test_unknown_transform_options_are_named_with_the_valid_ones(task, options, named):
    with pytest.raises(ValueError, match="unknown option") as info:
        build_transforms(task, True, 32, **options)
    text = str(info.value)
    bad = sorted(set(options) - {"mean"})
    assert str(bad) in text and named in text and "\n" not in text


def test_segmentation_training_without_a_crop_size_names_the_option():
    with pytest.raises(ValueError, match=r"crop size .*\(data\.size\)"):
        build_transforms("segmentation", True, None)


def test_a_size_among_the_transform_options_points_to_data_size():
    from maskd.engine.config import DataArgs

    for key in ("train_transforms", "val_transforms"):
        with pytest.raises(ValueError, match=rf"data\.{key}: 'size' .*data\.(val_)?size"):
            DataArgs(**{key: {"size": 64}})
