"""Models the registry does not build, distilled from Python with the package as it is.

A segmenter and an FCOS detector are put together here on timm ``features_only`` backbones
(random weights; a ResNet-10-T teacher, a MobileNetV3-Small student), following the task-model
contract of ``docs/design.md``. Both go through both stages with the public API alone: tokens
learned on the teacher with :class:`maskd.TokenLearner`, then the student distilled with
:class:`maskd.Distiller`, MasKD on one pair of layers plus a peer term (CWD or FitNet) on
another, named by their ``named_modules()`` paths inside the timm models.

Every loss is checked against a float64 computation written here from ``METHOD.md`` (MasKD)
and the term's paper, on the features recorded with plain forward hooks and the distiller's
frozen tokens and connectors.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import FCOS
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

from maskd import Distiller, TokenLearner, total_loss
from maskd.tokens import ReceptiveTokens
from tiny_detectors import detection_batch, snapshot

timm = pytest.importorskip("timm")

TEACHER, STUDENT = "resnet10t", "mobilenetv3_small_050"


# ---- the models: the task-model contract, written by hand ----------------------------------
class TimmSegmenter(nn.Module):
    """A timm backbone (strides 4 and 8) and a two-level head; logits ``[N, K, H, W]``.

    Training mode: ``forward(images, targets [N, H, W])`` → ``{"loss_seg": CE}`` (255 ignored);
    eval mode: logits at input size.
    """

    def __init__(self, name: str, num_classes: int = 3, width: int = 16) -> None:
        super().__init__()
        self.backbone = timm.create_model(
            name, pretrained=False, features_only=True, out_indices=(1, 2)
        )
        c4, c8 = self.backbone.feature_info.channels()
        self.lateral = nn.ModuleList([nn.Conv2d(c4, width, 1), nn.Conv2d(c8, width, 1)])
        self.classifier = nn.Conv2d(width, num_classes, 3, padding=1)

    def forward(self, images: Tensor | Sequence[Tensor], targets: Tensor | None = None) -> Any:
        x = images if isinstance(images, Tensor) else torch.stack(list(images))
        f4, f8 = self.backbone(x)
        up = F.interpolate(self.lateral[1](f8), size=f4.shape[-2:], mode="bilinear")
        logits = self.classifier(F.relu(self.lateral[0](f4) + up))
        logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear")
        if not self.training:
            return logits
        return {"loss_seg": F.cross_entropy(logits, targets, ignore_index=255)}


class TimmFPN(nn.Module):
    """A timm backbone (strides 8, 16, 32) under torchvision's FPN, plus a max-pooled level."""

    def __init__(self, name: str, width: int = 32) -> None:
        super().__init__()
        self.body = timm.create_model(
            name, pretrained=False, features_only=True, out_indices=(2, 3, 4)
        )
        channels = self.body.feature_info.channels()
        self.fpn = FeaturePyramidNetwork(channels, width, extra_blocks=LastLevelMaxPool())
        self.out_channels = width

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(self.body(x))))


def segmenter(name: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return TimmSegmenter(name)


def detector(name: str, seed: int) -> nn.Module:
    """torchvision's FCOS, as it is, on the timm FPN: 4 levels, 3 classes, 64 px input."""
    torch.manual_seed(seed)
    anchors = AnchorGenerator(((8,), (16,), (32,), (64,)), ((1.0,),) * 4)
    return FCOS(TimmFPN(name), num_classes=3, min_size=64, max_size=64, anchor_generator=anchors)


def segmentation_batch() -> tuple[Tensor, Tensor]:
    """Two 64x64 images; a square of class 1, a band of class 2, a few ignored pixels."""
    g = torch.Generator().manual_seed(3)
    images = torch.randn(2, 3, 64, 64, generator=g)
    targets = torch.zeros(2, 64, 64, dtype=torch.int64)
    targets[0, 10:40, 8:30] = 1
    targets[1, 30:50, :] = 2
    targets[:, :2] = 255
    images[:, 0] += (targets == 1).float()  # each class shows in its own channel
    images[:, 1] -= (targets == 2).float()
    return images, targets


# ---- the methods, literally, in float64 ----------------------------------------------------
def conv(x: Tensor, layer: nn.Module) -> Tensor:
    """A connector (1x1 conv or identity) applied in float64."""
    if isinstance(layer, nn.Identity):
        return x.double()
    assert isinstance(layer, nn.Conv2d) and layer.kernel_size == (1, 1)
    return F.conv2d(x.double(), layer.weight.double(), layer.bias.double())


def maskd_literal(s: Tensor, t: Tensor, tok: ReceptiveTokens) -> Tensor:
    """METHOD.md stage 2, eps 0, no custom mask: ``s`` aligned and ``t`` are ``[N, C, H, W]``.

    ``m_k(p) = sigmoid(<K_k, t(p)>)``; ``L[n,k,c] = Σ_p (m_k s_c − m_k t_c)² / Σ_p m_k``;
    weighted: ``mean_n Σ_k w[n,k] mean_c L[n,k,c]`` with ``w`` = softmax(conv1x1(GAP(conv3x3
    t))); unweighted: the mean of ``L``.
    """
    s, t = s.double(), t.double()
    m = torch.sigmoid(torch.einsum("kc,nchw->nkhw", tok.mask_token.double(), t))
    m5 = m[:, :, None]  # [N, T, 1, H, W]
    num = ((m5 * s[:, None] - m5 * t[:, None]) ** 2).sum(dim=(-2, -1))  # [N, T, C]
    loss = num / m.sum(dim=(-2, -1))[:, :, None]
    if tok.prob is None:
        return loss.mean()
    conv3, _, conv1 = tok.prob
    hidden = F.conv2d(t, conv3.weight.double(), conv3.bias.double(), padding=1)
    pooled = hidden.mean(dim=(-2, -1), keepdim=True)
    logits = F.conv2d(pooled, conv1.weight.double(), conv1.bias.double()).flatten(1)
    w = logits.exp() / logits.exp().sum(dim=1, keepdim=True)  # [N, T]
    return (w * loss.mean(dim=2)).sum(dim=1).mean()


def cwd_literal(s: Tensor, t: Tensor, tau: float) -> Tensor:
    """Shu et al. 2021: ``τ²/(N·C) Σ_{n,c} Σ_p p_T (log p_T − log p_S)``, softmax over H·W."""
    n, c = t.shape[:2]
    zs, zt = s.double().flatten(2) / tau, t.double().flatten(2) / tau
    p_s = zs.exp() / zs.exp().sum(dim=2, keepdim=True)
    p_t = zt.exp() / zt.exp().sum(dim=2, keepdim=True)
    return tau**2 / (n * c) * (p_t * (p_t.log() - p_s.log())).sum()


def fitnet_literal(s: Tensor, t: Tensor, tau: float) -> Tensor:
    """Romero et al. 2015: ``mean_{n,c,h,w} (s − t)²``."""
    return ((s.double() - t.double()) ** 2).sum() / t.numel()


# ---- the API (the only part that depends on how MasKD is given to the Distiller) ----------
def distiller_with(
    student: nn.Module,
    teacher: nn.Module,
    maskd_pair: tuple[str, str],
    tokens: dict[str, list[ReceptiveTokens]],
    maskd_weight: float,
    term: dict[str, Any],
) -> Distiller:
    """MasKD as a ``maskd`` term first, the peer method second."""
    maskd = {"kind": "maskd", "student": maskd_pair[0], "teacher": maskd_pair[1],
             "tokens": tokens, "weight": maskd_weight}  # fmt: skip
    return Distiller(student, teacher, [maskd, term])


def maskd_parts(distiller: Distiller) -> tuple[list[ReceptiveTokens], list[nn.Module]]:
    """The distiller's frozen tokens and its align connectors, one each per MasKD level."""
    maskd = distiller.terms[0]
    assert maskd.loss is not None
    return list(maskd.loss.tokens), list(maskd.connectors)


def term_connectors(distiller: Distiller) -> list[nn.Module]:
    _, term = distiller.terms
    return list(term.connectors)


# ---- the check, for both models ------------------------------------------------------------
def levels_of(output: Any) -> list[Tensor]:
    if isinstance(output, Tensor):
        return [output]
    return list(output.values()) if isinstance(output, dict) else list(output)


class Recording:
    """The latest output levels of named layers, through plain forward hooks."""

    def __init__(self, model: nn.Module, paths: Sequence[str]) -> None:
        self.levels: dict[str, list[Tensor]] = {}
        modules = dict(model.named_modules())
        for path in paths:
            modules[path].register_forward_hook(self._hook(path))

    def _hook(self, path: str) -> Callable[..., None]:
        def hook(_module: nn.Module, _args: object, output: Any) -> None:
            self.levels[path] = levels_of(output)

        return hook


@dataclass
class Case:
    build: Callable[[str, int], nn.Module]
    batch: Callable[[], tuple[Any, Any]]
    maskd: tuple[str, str]  # student layer, teacher layer
    term: dict[str, Any]
    term_literal: Callable[[Tensor, Tensor, float], Tensor]
    first_conv: Callable[[nn.Module], Tensor]  # a parameter deep in the student's timm backbone
    maskd_weight: float
    lr: float


CASES = {
    # MasKD on the two levels the timm backbone returns (a list), CWD on the logits conv.
    "segmenter": Case(
        build=segmenter,
        batch=segmentation_batch,
        maskd=("backbone", "backbone"),
        term={
            "kind": "cwd",
            "student": "classifier",
            "teacher": "classifier",
            "weight": 10.0,
            "tau": 2.0,
            "align": False,
        },
        term_literal=cwd_literal,
        first_conv=lambda m: m.backbone.conv_stem.weight,
        maskd_weight=10.0,
        lr=0.02,
    ),
    # MasKD on the FPN's four levels, FitNet from a MobileNet block to a ResNet stage (stride 16).
    "detector": Case(
        build=detector,
        batch=detection_batch,
        maskd=("backbone.fpn", "backbone.fpn"),
        term={
            "kind": "fitnet",
            "student": "backbone.body.blocks.3",
            "teacher": "backbone.body.layer3",
            "weight": 3.0,
        },
        term_literal=fitnet_literal,
        first_conv=lambda m: m.backbone.body.conv_stem.weight,
        maskd_weight=2.0,
        lr=0.01,
    ),
}


def assert_same(model: nn.Module, before: dict[str, Tensor], what: str) -> None:
    after = snapshot(model)
    assert after.keys() == before.keys()
    changed = [k for k, v in before.items() if not torch.equal(after[k], v)]
    assert not changed, f"{what} changed: {changed}"


@pytest.mark.parametrize("kind", list(CASES))
def test_timm_model_distilled_with_maskd_and_a_peer_term(kind: str) -> None:
    case = CASES[kind]
    teacher, student = case.build(TEACHER, 0), case.build(STUDENT, 1)
    images, targets = case.batch()
    teacher_before = snapshot(teacher)

    # Stage 1: tokens on the teacher's layer, through its own task loss and the Dice term.
    t_layer = case.maskd[1]
    learner = TokenLearner(teacher, [t_layer], num_tokens=4, weighted=True).train()
    start = snapshot(learner.level_tokens)
    opt = torch.optim.Adam(learner.level_tokens.parameters(), lr=0.05)
    for _ in range(3):
        opt.zero_grad()
        sum(learner(images, targets).values()).backward()
        opt.step()
    learned = learner.tokens()
    assert not any(p.grad is not None for p in teacher.parameters())
    moved = [k for k, v in snapshot(learner.level_tokens).items() if not torch.equal(v, start[k])]
    assert any(k.endswith("mask_token") for k in moved)

    # Stage 2: MasKD with the learned tokens beside the peer term.
    maskd_weight, tau = case.maskd_weight, float(case.term.get("tau", 1.0))
    distiller = distiller_with(student, teacher, case.maskd, learned, maskd_weight, case.term)
    distiller.train()
    tokens, aligns = maskd_parts(distiller)
    for frozen, tok in zip(tokens, learned[t_layer], strict=True):
        assert all(not p.requires_grad for p in frozen.parameters())
        for (name, a), b in zip(
            frozen.state_dict().items(), tok.state_dict().values(), strict=True
        ):
            assert torch.equal(a, b), f"frozen token entry {name} differs from the learned one"
    frozen_state = [snapshot(t) for t in tokens]

    term = case.term
    s_rec = Recording(student, [case.maskd[0], term["student"]])
    t_rec = Recording(teacher, [t_layer, term["teacher"]])
    term_key = f"loss_{term['kind']}"
    opt = torch.optim.SGD(distiller.trainable_parameters(), lr=case.lr, momentum=0.9)
    history = []
    for step in range(5):
        opt.zero_grad()
        losses = distiller(images, targets)
        distill = losses["loss_maskd"] + losses[term_key]
        history.append(float(distill.detach()))
        if step == 0:
            s_maskd, t_maskd = s_rec.levels[case.maskd[0]], t_rec.levels[t_layer]
            assert len(s_maskd) == len(t_maskd) == len(tokens) == len(aligns)
            expected = maskd_weight * sum(
                maskd_literal(conv(s, align), t, tok)
                for s, t, tok, align in zip(s_maskd, t_maskd, tokens, aligns, strict=True)
            )
            torch.testing.assert_close(
                losses["loss_maskd"].double(), expected, rtol=1e-5, atol=1e-8
            )
            s_term, t_term = s_rec.levels[term["student"]], t_rec.levels[term["teacher"]]
            expected = term["weight"] * sum(
                case.term_literal(conv(s, c), t, tau)
                for s, t, c in zip(s_term, t_term, term_connectors(distiller), strict=True)
            )
            torch.testing.assert_close(losses[term_key].double(), expected, rtol=1e-5, atol=1e-8)
            assert float(losses["loss_maskd"].detach()) > 0 < float(losses[term_key].detach())
            # Each distillation loss alone reaches the first conv of the student's timm backbone.
            for key in ("loss_maskd", term_key):
                (grad,) = torch.autograd.grad(
                    losses[key], case.first_conv(student), retain_graph=True
                )
                assert grad.abs().sum() > 0, f"{key} gives no gradient to the student backbone"
        total_loss(losses).backward()
        assert all(p.grad is None for p in teacher.parameters())
        opt.step()

    assert history[-1] < 0.9 * history[0], f"distillation loss per step: {history}"
    assert all(math.isfinite(v) for v in history)
    assert_same(teacher, teacher_before, "teacher")
    for state, frozen in zip(frozen_state, tokens, strict=True):
        assert_same(frozen, state, "frozen tokens")
