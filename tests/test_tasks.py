"""Tests for maskd.tasks.SegmentationTask: losses and predictions in the task-model contract."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.segmentation import (
    deeplabv3_mobilenet_v3_large,
    lraspp_mobilenet_v3_large,
)

from maskd.tasks import SegmentationTask, stack_images

K = 3


class LowRes(nn.Module):
    """Tiny segmenter with "out" and "aux" logits at half the input size."""

    def __init__(self, num_classes: int = K) -> None:
        super().__init__()
        self.body = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.out = nn.Conv2d(8, num_classes, 1)
        self.aux = nn.Conv2d(8, num_classes, 1)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        h = self.body(x).relu()
        return {"out": self.out(h), "aux": self.aux(h)}


def reference_ce(logits: Tensor, targets: Tensor, ignore: int) -> Tensor:
    """Mean negative log-likelihood over non-ignored pixels, written out by hand."""
    logp = logits.log_softmax(dim=1).permute(0, 2, 3, 1).reshape(-1, logits.shape[1])
    t = targets.reshape(-1)
    keep = t != ignore
    return -logp[keep].gather(1, t[keep, None]).mean()


def batch(n: int = 2, h: int = 16, w: int = 20) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    images = torch.randn(n, 3, h, w, generator=g)
    targets = torch.randint(0, K, (n, h, w), generator=g)
    targets[:, :3] = 255
    return images, targets


def test_losses_match_hand_computation() -> None:
    torch.manual_seed(0)
    net = LowRes()
    task = SegmentationTask(net, num_classes=K, ignore_index=255, aux_weight=0.4).train()
    images, targets = batch()
    losses = task(images, targets)
    assert set(losses) == {"loss_seg", "loss_aux"}
    raw = net(images)
    up = {
        k: F.interpolate(v, size=(16, 20), mode="bilinear", align_corners=False)
        for k, v in raw.items()
    }
    torch.testing.assert_close(losses["loss_seg"], reference_ce(up["out"], targets, 255))
    torch.testing.assert_close(losses["loss_aux"], 0.4 * reference_ce(up["aux"], targets, 255))


def test_eval_returns_logits_at_input_size() -> None:
    torch.manual_seed(0)
    net = LowRes()
    task = SegmentationTask(net, num_classes=K).eval()
    images, _ = batch()
    logits = task(images)
    expected = F.interpolate(
        net(images)["out"], size=(16, 20), mode="bilinear", align_corners=False
    )
    torch.testing.assert_close(logits, expected)
    # A list of [3, H, W] images is batched.
    torch.testing.assert_close(task(list(images)), expected)


def test_no_aux_term_without_aux_output_or_weight() -> None:
    net = nn.Conv2d(3, K, 1)
    images, targets = batch()
    losses = SegmentationTask(net, num_classes=K).train()(images, targets)
    assert set(losses) == {"loss_seg"}
    torch.testing.assert_close(losses["loss_seg"], reference_ce(net(images), targets, 255))
    losses = SegmentationTask(LowRes(), num_classes=K, aux_weight=0.0).train()(images, targets)
    assert set(losses) == {"loss_seg"}


def test_all_ignored_batch_gives_zero_loss_with_gradient() -> None:
    net = LowRes()
    images, targets = batch()
    targets.fill_(255)
    losses = SegmentationTask(net, num_classes=K).train()(images, targets)
    total = sum(losses.values())
    assert float(total.detach()) == 0.0
    total.backward()
    assert net.out.weight.grad is not None


@pytest.mark.parametrize("builder", [deeplabv3_mobilenet_v3_large, lraspp_mobilenet_v3_large])
def test_torchvision_segmenters(builder) -> None:
    torch.manual_seed(0)
    kwargs = {"aux_loss": True} if builder is deeplabv3_mobilenet_v3_large else {}
    net = builder(weights=None, weights_backbone=None, num_classes=K, **kwargs)
    task = SegmentationTask(net, num_classes=K).train()
    images, targets = batch(2, 64, 64)
    losses = task(images, targets)
    expected_keys = {"loss_seg", "loss_aux"} if kwargs else {"loss_seg"}
    assert set(losses) == expected_keys
    assert all(torch.isfinite(v) for v in losses.values())
    task.eval()
    assert task(images).shape == (2, K, 64, 64)
    assert "model.classifier" in dict(task.named_modules())


def test_bad_inputs() -> None:
    task = SegmentationTask(LowRes(), num_classes=K).train()
    images, targets = batch()
    with pytest.raises(ValueError, match="targets \\[N, H, W\\] are required"):
        task(images)
    with pytest.raises(ValueError, match=r"targets hold 1 masks for 2 images"):
        task(images, targets[:1])
    with pytest.raises(
        ValueError, match=r"targets must be an int64 \[N, H, W\] tensor, got \(2, 20\)"
    ):
        task(images, targets[:, 0])
    with pytest.raises(TypeError, match="integer tensor"):
        task(images, targets.float())
    bad = targets.clone()
    bad[0, 5, 5] = K
    with pytest.raises(ValueError, match=r"target labels must lie in \[0, 2\]"):
        task(images, bad)
    with pytest.raises(ValueError, match="output 'out' has 3 channels but num_classes=4"):
        SegmentationTask(LowRes(), num_classes=4).train()(images, targets)
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        SegmentationTask(LowRes(), num_classes=0)
    with pytest.raises(ValueError, match="aux_weight"):
        SegmentationTask(LowRes(), num_classes=K, aux_weight=-1)
    with pytest.raises(ValueError, match=r"images\[1\] must be a \[3, H, W\] tensor"):
        stack_images([torch.zeros(3, 4, 4), torch.zeros(4, 4)])
    with pytest.raises(ValueError, match="same size"):
        stack_images([torch.zeros(3, 4, 4), torch.zeros(3, 4, 5)])
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        stack_images(torch.zeros(3, 4, 4))
