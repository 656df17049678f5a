"""Tests for maskd.visualize.token_masks on a detector: masks over the resized, padded batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from maskd.tokens import ReceptiveTokens
from maskd.visualize import token_masks
from tiny_detectors import detection_batch, detector


def test_detector_masks_keep_the_part_over_each_image() -> None:
    model = detector("retinanet", 0, nn.BatchNorm2d, min_size=96).train()
    torch.manual_seed(3)
    toks = [ReceptiveTokens(256, 2) for _ in range(5)]
    images, _ = detection_batch()  # two 64x80 images → resized 76x96, padded 96x96
    masks = token_masks(model, {"backbone.fpn": toks}, images)
    assert model.training and list(masks) == [
        f"backbone.fpn:{k}" for k in ("0", "1", "2", "p6", "p7")
    ]
    # By hand: the FPN in eval mode on the transformed batch, each level's masks cropped to
    # the image's share of the padded batch, then resized to the input image.
    with torch.no_grad():
        model.eval()
        image_list, _ = model.transform(torch.stack(images))
        feats = model.backbone(image_list.tensors)
        model.train()
    assert image_list.image_sizes == [(76, 96), (76, 96)]
    assert tuple(image_list.tensors.shape[-2:]) == (96, 96)
    for (key, feat), tok in zip(feats.items(), toks, strict=True):
        with torch.no_grad():
            full = tok(feat)  # [2, 2, h, w]
        h, w = full.shape[-2:]
        crop = full[..., : max(1, round(h * 76 / 96)), : max(1, round(w * 96 / 96))]
        want = F.interpolate(crop, size=(64, 80), mode="bilinear")
        got = masks[f"backbone.fpn:{key}"]
        assert len(got) == 2 and got[0].shape == (2, 64, 80)
        for i in range(2):
            torch.testing.assert_close(got[i], want[i])
        if h > 4:  # the crop matters: the whole padded map gives other masks
            uncropped = F.interpolate(full, size=(64, 80), mode="bilinear")
            assert not torch.allclose(got[0], uncropped[0])
