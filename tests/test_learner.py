"""Tests for maskd.learner.TokenLearner (stage 1) on small torchvision models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.segmentation import (
    deeplabv3_mobilenet_v3_large,
    lraspp_mobilenet_v3_large,
)

from maskd.learner import TokenLearner, keep_normalization_eval
from maskd.losses import dice_diversity
from maskd.tasks import SegmentationTask
from maskd.tokens import ReceptiveTokens
from tiny_detectors import DETECTORS, detection_batch, detector, snapshot


def assert_unchanged(model: nn.Module, before: dict[str, Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), f"teacher entry {key} changed"


def train_steps(learner: TokenLearner, images, targets, steps: int = 3) -> dict[str, Tensor]:
    opt = torch.optim.Adam([p for p in learner.parameters() if p.requires_grad], lr=0.01)
    losses: dict[str, Tensor] = {}
    for _ in range(steps):
        opt.zero_grad()
        losses = learner(images, targets)
        sum(losses.values()).backward()
        opt.step()
    return losses


@pytest.mark.parametrize("kind", list(DETECTORS))
def test_detector_only_tokens_train_and_teacher_stays_identical(kind: str) -> None:
    teacher = detector(kind)
    before = snapshot(teacher)
    learner = TokenLearner(teacher, ["backbone.fpn"], num_tokens=4, weighted=True)
    learner.train()
    assert teacher.training  # detectors only return losses in training mode
    norms = [m for m in teacher.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and not any(m.training for m in norms)

    tokens = learner.tokens()
    levels = ["0", "1", "2", "3", "pool"] if kind == "fasterrcnn" else ["0", "1", "2", "p6", "p7"]
    assert learner.level_names == {"backbone.fpn": [f"backbone.fpn:{k}" for k in levels]}
    assert list(tokens) == ["backbone.fpn"] and len(tokens["backbone.fpn"]) == len(levels)
    assert all(
        t.channels == 256 and t.num_tokens == 4 and t.weighted for t in tokens["backbone.fpn"]
    )
    start = [t.mask_token.detach().clone() for t in tokens["backbone.fpn"]]

    images, targets = detection_batch()
    opt = torch.optim.Adam([p for p in learner.parameters() if p.requires_grad], lr=0.01)
    for _ in range(2):
        opt.zero_grad()
        losses = learner(images, targets)
        sum(losses.values()).backward()
        assert all(p.grad is None for p in teacher.parameters())
        for tok in tokens["backbone.fpn"]:
            assert tok.mask_token.grad is not None and tok.mask_token.grad.abs().sum() > 0
        opt.step()
    assert "loss_dice" in losses and len(losses) >= 3
    assert_unchanged(teacher, before)
    for tok, old in zip(tokens["backbone.fpn"], start, strict=True):
        assert not torch.equal(tok.mask_token, old)
    assert {n.split(".")[0] for n, p in learner.named_parameters() if p.requires_grad} == {
        "level_tokens"
    }


def test_dice_loss_matches_features_captured_by_hand() -> None:
    teacher = detector("retinanet")
    learner = TokenLearner(teacher, ["backbone.fpn"], num_tokens=3, dice_weight=0.5).train()
    images, targets = detection_batch()
    losses = learner(images, targets)
    with torch.no_grad():
        batch, _ = teacher.transform(images, targets)
        feats = teacher.backbone(batch.tensors)
    tokens = learner.tokens()["backbone.fpn"]
    expected = 0.5 * sum(
        dice_diversity(tok(f)) for tok, f in zip(tokens, feats.values(), strict=True)
    )
    torch.testing.assert_close(losses["loss_dice"], expected)


class SmallSegmenter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.5)
        )
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {"out": self.head(self.body(x))}


def test_teacher_continues_on_masked_features() -> None:
    torch.manual_seed(0)
    net = SmallSegmenter()
    teacher = SegmentationTask(net, num_classes=3)
    learner = TokenLearner(teacher, ["model.head"], num_tokens=2, weighted=False).train()
    assert learner.level_names == {"model.head": ["model.head"]}
    assert not net.body[1].training and not net.body[3].training  # BatchNorm, Dropout

    g = torch.Generator().manual_seed(3)
    images = torch.randn(2, 3, 16, 16, generator=g)
    targets = torch.randint(0, 3, (2, 16, 16), generator=g)
    losses = learner(images, targets)

    with torch.no_grad():
        logits = net.head(net.body(images))  # the body runs in eval mode: deterministic
    token = learner.tokens()["model.head"][0].mask_token.detach()
    masks = torch.einsum("tc,nchw->nthw", token, logits).sigmoid()
    masked = masks.sum(dim=1, keepdim=True) * logits
    up = F.interpolate(masked, size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(losses["loss_seg"], F.cross_entropy(up, targets))
    torch.testing.assert_close(losses["loss_dice"], dice_diversity(masks))


@pytest.mark.parametrize(
    ("builder", "layer"),
    [
        (deeplabv3_mobilenet_v3_large, "model.classifier.4"),
        (lraspp_mobilenet_v3_large, "model.classifier"),
    ],
)
def test_torchvision_segmenters_freeze(builder, layer: str) -> None:
    torch.manual_seed(0)
    kwargs = {"aux_loss": True} if builder is deeplabv3_mobilenet_v3_large else {}
    teacher = SegmentationTask(
        builder(weights=None, weights_backbone=None, num_classes=3, **kwargs), 3
    )
    before = snapshot(teacher)
    learner = TokenLearner(
        teacher, [layer], num_tokens=8, weighted=False, example_input=torch.zeros(2, 3, 64, 64)
    )
    assert learner.tokens()[layer][0].channels == 3
    g = torch.Generator().manual_seed(4)
    images = torch.randn(2, 3, 64, 64, generator=g)
    targets = torch.randint(0, 3, (2, 64, 64), generator=g)
    losses = train_steps(learner, images, targets, steps=2)
    assert "loss_seg" in losses and "loss_dice" in losses
    assert all(p.grad is None for p in teacher.parameters())
    assert learner.tokens()[layer][0].mask_token.grad.abs().sum() > 0
    assert_unchanged(teacher, before)


def test_train_and_eval_modes() -> None:
    teacher = detector("retinanet")
    learner = TokenLearner(teacher, ["backbone.fpn"])
    learner.eval()
    assert not any(m.training for m in teacher.modules())
    images, _ = detection_batch()
    preds = learner(images)
    assert isinstance(preds, list) and set(preds[0]) == {"boxes", "scores", "labels"}
    learner.train()
    assert teacher.head.training
    assert not any(m.training for m in teacher.modules() if isinstance(m, nn.BatchNorm2d))
    # keep_normalization_eval leaves other modules alone.
    seq = nn.Sequential(nn.Conv2d(1, 1, 1), nn.BatchNorm2d(1), nn.Dropout()).train()
    keep_normalization_eval(seq)
    assert [m.training for m in seq] == [True, False, False]


def test_bad_arguments() -> None:
    net = SmallSegmenter()
    with pytest.raises(ValueError, match=r"unknown layer 'model.haed'.*'model.head'"):
        TokenLearner(SegmentationTask(net, 3), ["model.haed"])
    with pytest.raises(ValueError, match="num_tokens must be a positive int"):
        TokenLearner(SegmentationTask(net, 3), ["model.head"], num_tokens=0)
    with pytest.raises(ValueError, match="dice_weight"):
        TokenLearner(SegmentationTask(net, 3), ["model.head"], dice_weight=-1.0)
    with pytest.raises(TypeError, match="teacher must be an nn.Module"):
        TokenLearner("net", ["head"])  # type: ignore[arg-type]

    class Bare(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Conv2d(3, 2, 1)

        def forward(self, x: Tensor, targets: Tensor | None = None) -> Tensor:
            return self.head(x)

    bare = TokenLearner(Bare(), ["head"], weighted=False).train()
    with pytest.raises(TypeError, match="wrap segmenters in maskd.SegmentationTask"):
        bare(torch.randn(1, 3, 8, 8), None)


def test_tokens_are_the_learners_modules() -> None:
    learner = TokenLearner(SegmentationTask(SmallSegmenter(), 3), ["model.head", "model.body"])
    tokens = learner.tokens()
    assert list(tokens) == ["model.head", "model.body"]
    assert [t[0].channels for t in tokens.values()] == [3, 8]
    assert all(isinstance(t[0], ReceptiveTokens) for t in tokens.values())
    owned = {id(p) for p in learner.level_tokens.parameters()}
    assert all(id(p) in owned for group in tokens.values() for t in group for p in t.parameters())


def test_train_teacher_mode_uses_batch_statistics_and_keeps_parameters() -> None:
    """teacher_mode="train" (the authors' segmentation stage 1): BatchNorm normalises with the
    batch's statistics, Dropout is active, the running statistics move, the parameters never."""
    torch.manual_seed(0)
    net = SmallSegmenter()
    conv, bn, drop, head = net.body[0], net.body[1], net.body[3], net.head
    with torch.no_grad():  # running statistics far from any batch's
        bn.running_mean.fill_(3.0)
        bn.running_var.fill_(9.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    teacher = SegmentationTask(net, num_classes=3)
    params = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    learner = TokenLearner(teacher, ["model.head"], 2, weighted=False, teacher_mode="train")
    learner.train()
    assert all(m.training for m in teacher.modules())
    tok = learner.tokens()["model.head"][0]
    nn.init.normal_(tok.mask_token, std=0.5)
    start = tok.mask_token.detach().clone()

    g = torch.Generator().manual_seed(3)
    images = torch.randn(4, 3, 16, 16, generator=g)
    targets = torch.randint(0, 3, (4, 16, 16), generator=g)
    torch.manual_seed(11)
    losses = learner(images, targets)

    def by_hand(train: bool) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            x = conv(images)
            if train:
                mean = x.mean(dim=(0, 2, 3))
                var = x.var(dim=(0, 2, 3), unbiased=False)
            else:
                mean, var = torch.full((8,), 3.0), torch.full((8,), 9.0)
            x = (x - mean[:, None, None]) / torch.sqrt(var[:, None, None] + bn.eps)
            x = F.relu(x * bn.weight[:, None, None] + bn.bias[:, None, None])
            if train:
                torch.manual_seed(11)  # the dropout draws the learner's forward made
                x = F.dropout(x, drop.p, training=True)
            logits = head(x)
            masks = torch.einsum("tc,nchw->nthw", tok.mask_token, logits).sigmoid()
            up = F.interpolate(
                masks.sum(dim=1, keepdim=True) * logits,
                size=(16, 16),
                mode="bilinear",
                align_corners=False,
            )
            return F.cross_entropy(up, targets), mean

    want, batch_mean = by_hand(train=True)
    torch.testing.assert_close(losses["loss_seg"], want)
    assert not torch.allclose(losses["loss_seg"], by_hand(train=False)[0], rtol=0, atol=1e-3)
    # The running statistics of this teacher copy update, as in the authors' script.
    torch.testing.assert_close(bn.running_mean, 0.9 * 3.0 + 0.1 * batch_mean)

    opt = torch.optim.SGD(
        [p for p in learner.parameters() if p.requires_grad],
        lr=0.1,
        momentum=0.9,
        weight_decay=1e-3,
    )
    for _ in range(3):
        opt.zero_grad()
        sum(learner(images, targets).values()).backward()
        assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
        opt.step()
    for name, value in teacher.named_parameters():
        assert torch.equal(value, params[name]), f"teacher parameter {name} changed"
    assert not torch.equal(tok.mask_token, start)
    learner.eval()
    assert not any(m.training for m in teacher.modules())


def test_teacher_mode_is_checked() -> None:
    with pytest.raises(ValueError, match=r"teacher_mode must be one of \['eval', 'train'\]"):
        TokenLearner(SegmentationTask(SmallSegmenter(), 3), ["model.head"], teacher_mode="frozen")


def test_stage1_checkpoint_keeps_a_training_teachers_statistics() -> None:
    """A train-mode teacher's BatchNorm buffers go into the checkpoint (its parameters do not),
    the recorded hash is the teacher as loaded, and a fresh run resumes the moved statistics."""
    from maskd.engine.modules import LearnMasksModule, state_fingerprint

    def module(mode: str) -> LearnMasksModule:
        torch.manual_seed(0)
        teacher = SegmentationTask(SmallSegmenter(), 3)
        learner = TokenLearner(teacher, ["model.head"], 2, weighted=False, teacher_mode=mode)
        return LearnMasksModule(learner, "segmentation", 3)

    run = module("train")
    loaded = state_fingerprint(run.net.teacher)
    g = torch.Generator().manual_seed(5)
    run.net.train()
    run.net(torch.randn(2, 3, 16, 16, generator=g), torch.randint(0, 3, (2, 16, 16), generator=g))
    moved = {k: v.clone() for k, v in run.net.teacher.state_dict().items()}
    assert not torch.equal(moved["model.body.1.running_mean"], torch.zeros(8))

    ckpt = {"state_dict": run.state_dict()}
    run.on_save_checkpoint(ckpt)
    kept = {k for k in ckpt["state_dict"] if k.startswith("net.teacher.")}
    assert kept == {f"net.teacher.{n}" for n, _ in run.net.teacher.named_buffers()}
    assert ckpt["maskd_teacher"]["sha256"] == loaded != state_fingerprint(run.net.teacher)

    fresh = module("train")
    fresh.on_load_checkpoint(ckpt)
    fresh.load_state_dict(ckpt["state_dict"])
    for key, value in fresh.net.teacher.state_dict().items():
        assert torch.equal(value, moved[key]), key

    still = module("eval")
    ckpt = {"state_dict": still.state_dict()}
    still.on_save_checkpoint(ckpt)
    assert not [k for k in ckpt["state_dict"] if k.startswith("net.teacher.")]
