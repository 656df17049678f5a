"""Tests for the distillation terms (MasKD, FitNet, CWD, FGD, logits KD) and their use in
stage 2: the options of ``maskd distill`` turned into terms, and every kind through the command.

Each loss is checked against a literal float64 computation written here from the paper's
formula (values and gradients), and on hand-made cases whose answer is known. The head terms
(retinanet_l1, rcnn_smoothl1) are checked in test_head_kd.py.
"""

from __future__ import annotations

import copy
import csv
import itertools
import json
import math
import re
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torchvision.ops import FrozenBatchNorm2d

from maskd.distiller import Distiller, total_loss
from maskd.terms import (
    TERMS,
    FGDTerm,
    FitNetTerm,
    MaskdTerm,
    TermContext,
    build_term,
    channel_wise_divergence,
    fgd_attention,
    fgd_masks,
    fitnet_loss,
    pixel_kd_loss,
)
from maskd.terms.fgd import FGD_DEFAULTS
from maskd.tokens import ReceptiveTokens
from tiny_detectors import detection_batch, detector

FPN = "backbone.fpn"


def pair(seed: int, shape=(2, 3, 4, 5)) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)


def check_against(fn, literal, s: Tensor, t: Tensor) -> None:
    """``fn`` and ``literal`` (float64) agree in value and in the gradient wrt ``s``."""
    s1 = s.clone().requires_grad_(True)
    s2 = s.double().clone().requires_grad_(True)
    a, b = fn(s1, t), literal(s2, t.double())
    a.backward()
    b.backward()
    torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s1.grad.double(), s2.grad, rtol=1e-4, atol=1e-6)


# ---- FitNet ---------------------------------------------------------------------------------
def test_fitnet_is_the_mean_squared_difference() -> None:
    def literal(s, t):
        n, c, h, w = s.shape
        total = sum(
            (s[i, j, y, x] - t[i, j, y, x]) ** 2
            for i, j, y, x in itertools.product(range(n), range(c), range(h), range(w))
        )
        return total / (n * c * h * w)

    check_against(fitnet_loss, literal, *pair(0))
    s, _ = pair(1)
    assert float(fitnet_loss(s, s)) == 0.0


# ---- CWD ------------------------------------------------------------------------------------
def cwd_literal(s: Tensor, t: Tensor, tau: float) -> Tensor:
    n, c, h, w = s.shape
    total = torch.zeros((), dtype=torch.float64)
    for i, j in itertools.product(range(n), range(c)):
        zs = [s[i, j, y, x] / tau for y in range(h) for x in range(w)]
        zt = [t[i, j, y, x] / tau for y in range(h) for x in range(w)]
        ls = torch.stack(zs) - torch.logsumexp(torch.stack(zs), 0)
        lt = torch.stack(zt) - torch.logsumexp(torch.stack(zt), 0)
        total = total + sum(math.e ** float(a) * (a - b) for a, b in zip(lt, ls, strict=True))
    return total * tau * tau / (n * c)


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_cwd_matches_the_per_channel_kl_of_the_paper(tau: float) -> None:
    check_against(
        lambda s, t: channel_wise_divergence(s, t, tau),
        lambda s, t: cwd_literal(s, t, tau),
        *pair(2),
    )


def test_cwd_known_cases() -> None:
    s, t = pair(3)
    assert abs(float(channel_wise_divergence(t, t, 2.0))) < 1e-6
    # a map constant over positions is the uniform distribution whatever its level
    flat_s = torch.ones(2, 3, 4, 5) * torch.randn(2, 3, 1, 1)
    flat_t = torch.ones(2, 3, 4, 5) * torch.randn(2, 3, 1, 1)
    assert abs(float(channel_wise_divergence(flat_s, flat_t))) < 1e-6
    # uniform teacher: KL(u || p) = -log(HW) - mean_p log p, averaged over channels, × τ²
    tau = 2.0
    log_p = torch.log_softmax(s.flatten(2) / tau, dim=2)
    expected = (-math.log(20) - log_p.mean(dim=2)).mean() * tau * tau
    torch.testing.assert_close(channel_wise_divergence(s, flat_t, tau), expected)


# ---- logits KD ------------------------------------------------------------------------------
def test_pixel_kd_matches_the_per_pixel_kl() -> None:
    def literal(s, t, tau=2.0):
        n, _, h, w = s.shape
        total = torch.zeros((), dtype=torch.float64)
        for i, y, x in itertools.product(range(n), range(h), range(w)):
            ls = torch.log_softmax(s[i, :, y, x] / tau, 0)
            lt = torch.log_softmax(t[i, :, y, x] / tau, 0)
            total = total + (lt.exp() * (lt - ls)).sum()
        return total * tau * tau / (n * h * w)

    check_against(lambda s, t: pixel_kd_loss(s, t, 2.0), literal, *pair(4))
    s, _ = pair(5)
    assert abs(float(pixel_kd_loss(s, s, 3.0))) < 1e-6


# ---- FGD ------------------------------------------------------------------------------------
def test_fgd_masks_by_hand() -> None:
    # input 32x32 → an 8x8 grid (stride 4); box (4, 8, 12, 20) covers cells x 1..3, y 2..5
    boxes = [torch.tensor([[4.0, 8.0, 12.0, 20.0], [0.0, 0.0, 30.0, 30.0]]), torch.zeros(0, 4)]
    fg, bg = fgd_masks(boxes, (32, 32), 8, 8)
    small = 1.0 / ((5 + 1 - 2) * (3 + 1 - 1))  # (hmax + 1 - hmin)(wmax + 1 - wmin)
    large = 1.0 / ((8 - 0 + 1) * (8 - 0 + 1))
    expected = torch.zeros(2, 8, 8)
    expected[0, :, :] = large  # the big box covers all (clipped to the grid)
    expected[0, 2:6, 1:4] = small  # the smaller box's larger value wins where they overlap
    torch.testing.assert_close(fg, expected)
    # background: none in image 0 (all covered), uniform 1 / (H·W) with no boxes
    torch.testing.assert_close(bg[0], torch.zeros(8, 8))
    torch.testing.assert_close(bg[1], torch.full((8, 8), 1 / 64))


def fgd_literal(s, t, fg, bg, tau, a, b, g, gc_s, gc_t) -> Tensor:
    """FGD's loss transcribed from the paper/authors' code, with sqrt-weighted features."""
    n, c, h, w = s.shape

    def attention(x):
        v = x.abs()
        sp = h * w * torch.softmax((v.mean(dim=1) / tau).reshape(n, -1), dim=1).reshape(n, h, w)
        ch = c * torch.softmax(v.mean(dim=(2, 3)) / tau, dim=1)
        return sp, ch

    st, ct = attention(t)
    ss, cs = attention(s)
    sqrt_w = torch.sqrt(st)[:, None] * torch.sqrt(ct)[:, :, None, None]
    fea_t, fea_s = t * sqrt_w, s * sqrt_w
    fg_loss = ((fea_s * fg[:, None].sqrt() - fea_t * fg[:, None].sqrt()) ** 2).sum() / n
    bg_loss = ((fea_s * bg[:, None].sqrt() - fea_t * bg[:, None].sqrt()) ** 2).sum() / n
    mask_loss = (cs - ct).abs().sum() / n + (ss - st).abs().sum() / n
    rela = ((gc_s(s) - gc_t(t)) ** 2).sum() / n
    return a * fg_loss + b * bg_loss + g * mask_loss + rela


def test_fgd_level_loss_matches_the_formula_with_gradients() -> None:
    torch.manual_seed(0)
    s, t = pair(6, (2, 4, 8, 8))
    term = FGDTerm(FPN, FPN, detector="retinanet", lambda_=1.0)
    term.build([s], [t], ["p3"])
    for gc in (*term.student_context, *term.teacher_context):  # non-trivial global blocks
        nn.init.normal_(gc.transform[-1].weight, std=0.3)
    ctx = TermContext(
        boxes=[torch.tensor([[4.0, 8.0, 12.0, 20.0]]), torch.zeros(0, 4)], input_size=(32, 32)
    )
    fg, bg = fgd_masks(ctx.boxes, ctx.input_size, 8, 8)
    tau, a, b, g, _ = FGD_DEFAULTS["retinanet"]
    gc_s = copy.deepcopy(term.student_context[0]).double()
    gc_t = copy.deepcopy(term.teacher_context[0]).double()
    term64 = copy.deepcopy(term).double()  # the term in float64: gradients compare tightly
    check_against(
        lambda x, y: term64.level_loss(x.double(), y.double(), 0, ctx),
        lambda x, y: fgd_literal(x, y, fg.double(), bg.double(), tau, a, b, g, gc_s, gc_t),
        s,
        t,
    )


def test_fgd_known_cases() -> None:
    s, t = pair(7, (2, 4, 8, 8))
    term = FGDTerm(FPN, FPN)
    term.build([s], [t], ["p3"])
    ctx = TermContext(boxes=[torch.zeros(0, 4), torch.zeros(0, 4)], input_size=(32, 32))
    # identical features: every part is 0 (the global blocks start as the identity)
    assert float(term.level_loss(t, t, 0, ctx).detach()) == 0.0
    # no boxes at all: only the background part of the focal loss is left
    only_bg = FGDTerm(FPN, FPN, alpha=1.0, beta=1.0, gamma=0.0, lambda_=0.0)
    only_bg.build([s], [t], ["p3"])
    st, ct = fgd_attention(t, 0.5)
    expected = (st[:, None] * ct[:, :, None, None] * (s - t) ** 2).sum() / 2 / 64
    torch.testing.assert_close(only_bg.level_loss(s, t, 0, ctx), expected)
    with pytest.raises(ValueError, match="fgd term needs the ground-truth boxes"):
        term.level_loss(s, t, 0, TermContext())


# ---- MasKD ----------------------------------------------------------------------------------
def maskd_literal(student, teacher, tokens, connectors, weight, level_weights, eps, custom):
    """MasKD's stage-2 loss transcribed from the paper, level by level, channel by channel."""
    total, levels = 0.0, []
    for s, t, tok, conv, lw in zip(
        student, teacher, tokens, connectors, level_weights, strict=True
    ):
        n, c = t.shape[:2]
        a = torch.einsum("oc,nchw->nohw", conv.weight[:, :, 0, 0], s) + conv.bias[:, None, None]
        key = tok.mask_token  # [T, C]
        m = 1 / (1 + torch.exp(-torch.einsum("kc,nchw->nkhw", key, t)))
        if custom:  # times the mask of the aligned student feature (no gradient through it)
            m = m * (1 / (1 + torch.exp(-torch.einsum("kc,nchw->nkhw", key, a.detach()))))
        weights = tok.token_weights(t)
        level = 0.0
        for i, k in itertools.product(range(n), range(tok.num_tokens)):
            area = m[i, k].sum() + eps
            per_channel = [((m[i, k] ** 2) * (a[i, j] - t[i, j]) ** 2).sum() / area
                           for j in range(c)]  # fmt: skip
            mean_c = sum(per_channel) / c
            if weights is None:
                level = level + mean_c / (n * tok.num_tokens)
            else:
                level = level + weights[i, k] * mean_c / n
        levels.append(level)
        total = total + lw * level
    return weight * total, levels


@pytest.mark.parametrize("custom", [False, True])
def test_maskd_term_matches_the_papers_loss_with_gradients(custom: bool) -> None:
    torch.manual_seed(0)
    shapes = [(2, 3, 4, 5), (2, 3, 2, 3)]
    student = [torch.randn(*sh, dtype=torch.float64).mul_(2) for sh in [(2, 2, 4, 5), (2, 2, 2, 3)]]
    teacher = [torch.randn(*sh, dtype=torch.float64) for sh in shapes]
    tokens = [ReceptiveTokens(3, 2, weighted=True).double(), ReceptiveTokens(3, 3).double()]
    for tok in tokens:
        nn.init.normal_(tok.mask_token, std=0.7)
    term = MaskdTerm(FPN, FPN, tokens, weight=7.0, level_weights=[1.0, 0.4], eps=1e-5,
                     custom_mask_warmup=2)  # fmt: skip
    term.build(student, teacher, ["p3", "p4"])
    term.double()
    for conv in term.connectors:  # connectors 2 → 3 channels, non-trivial biases
        nn.init.normal_(conv.bias)
    term.set_step(2 if custom else 1)
    s = [x.clone().requires_grad_() for x in student]
    out = term.compare(s, teacher, TermContext())
    assert list(out) == ["loss_maskd", "maskd/p3", "maskd/p4"]
    s_ref = [x.clone().requires_grad_() for x in student]
    ref, ref_levels = maskd_literal(
        s_ref, teacher, term.loss.tokens, term.connectors, 7.0, [1.0, 0.4], 1e-5, custom
    )
    torch.testing.assert_close(out["loss_maskd"], ref, rtol=1e-10, atol=0)
    for name, level in zip(["p3", "p4"], ref_levels, strict=True):
        torch.testing.assert_close(out[f"maskd/{name}"], level.detach(), rtol=1e-10, atol=0)
    params = [p for conv in term.connectors for p in conv.parameters()]
    got = torch.autograd.grad(out["loss_maskd"], [*s, *params])
    want = torch.autograd.grad(ref, [*s_ref, *params])
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-12)
    assert all(p.grad is None for tok in term.loss.tokens for p in tok.parameters())


def test_maskd_term_equal_token_weights_ignores_the_head() -> None:
    """``token_weights="equal"``: weighted tokens count 1/T each, as tokens without a head
    built here by hand; the caller's tokens keep their head."""
    torch.manual_seed(1)
    student = [torch.randn(2, 3, 4, 5, dtype=torch.float64)]
    teacher = [torch.randn(2, 3, 4, 5, dtype=torch.float64)]
    weighted = ReceptiveTokens(3, 4, weighted=True).double()
    nn.init.normal_(weighted.mask_token, std=0.7)
    bare = ReceptiveTokens(3, 4).double()
    with torch.no_grad():
        bare.mask_token.copy_(weighted.mask_token)
    same = nn.Conv2d(3, 3, 1).double()  # align=False: the literal loss's identity connector
    with torch.no_grad():
        same.weight.copy_(torch.eye(3, dtype=torch.float64)[:, :, None, None])
        same.bias.zero_()
    outs = {}
    for mode in ("equal", "head"):
        term = MaskdTerm(FPN, FPN, [weighted], weight=2.0, token_weights=mode, align=False)
        term.build(student, teacher, ["p3"])
        outs[mode] = term.compare(student, teacher, TermContext())["loss_maskd"]
        ref, _ = maskd_literal(student, teacher, [bare if mode == "equal" else weighted],
                               [same], 2.0, [1.0], 0.0, False)  # fmt: skip
        torch.testing.assert_close(outs[mode], ref, rtol=1e-10, atol=0)
    assert not torch.isclose(outs["equal"], outs["head"])  # the head's weights mattered
    assert weighted.prob is not None and "token_weights=equal" in repr(
        MaskdTerm(FPN, FPN, [weighted], token_weights="equal")
    )
    with pytest.raises(ValueError, match="token_weights must be 'head' or 'equal', got 'mean'"):
        MaskdTerm(FPN, FPN, [weighted], token_weights="mean")


# ---- specs and the Distiller ----------------------------------------------------------------
def test_build_term_errors_name_the_valid_choices() -> None:
    with pytest.raises(ValueError, match=r"unknown distillation term kind 'kd'; valid kinds: \["):
        build_term({"kind": "kd", "student": FPN, "teacher": FPN})
    with pytest.raises(ValueError, match=r"cwd term: unknown options \['temp'\]; valid options"):
        build_term({"kind": "cwd", "student": FPN, "teacher": FPN, "temp": 2})
    with pytest.raises(ValueError, match=r"cwd term: tau must be in \(0, inf\), got 0"):
        build_term({"kind": "cwd", "student": FPN, "teacher": FPN, "tau": 0})
    with pytest.raises(TypeError, match="logits_kd term: tau must be a number, got '2'"):
        build_term({"kind": "logits_kd", "student": FPN, "teacher": FPN, "tau": "2"})
    with pytest.raises(ValueError, match=r"fgd term: alpha must be in \[0, inf\), got -1"):
        build_term({"kind": "fgd", "student": FPN, "teacher": FPN, "alpha": -1})
    with pytest.raises(ValueError, match=r"fgd term: temperature must be in \(0, inf\), got 0"):
        build_term({"kind": "fgd", "student": FPN, "teacher": FPN, "temperature": 0})
    with pytest.raises(TypeError, match="fgd term: gamma must be a number, got True"):
        build_term({"kind": "fgd", "student": FPN, "teacher": FPN, "gamma": True})
    with pytest.raises(ValueError, match="detector must be one of"):
        build_term({"kind": "fgd", "student": FPN, "teacher": FPN, "detector": "yolo"})
    with pytest.raises(ValueError, match="fitnet term: weight must be finite, got nan"):
        build_term({"kind": "fitnet", "student": FPN, "teacher": FPN, "weight": float("nan")})
    with pytest.raises(ValueError, match=r"rcnn_smoothl1 term: weight must be in \[0, inf\)"):
        build_term({"kind": "rcnn_smoothl1", "weight": -2})
    with pytest.raises(ValueError, match="teacher layer path missing"):
        build_term({"kind": "fitnet", "student": FPN})
    with pytest.raises(ValueError, match="maskd term: tokens missing"):
        build_term({"kind": "maskd", "student": FPN, "teacher": FPN})
    with pytest.raises(ValueError, match=r"retinanet_l1 term: unknown options \['student'\]"):
        build_term({"kind": "retinanet_l1", "student": FPN})
    assert sorted(TERMS) == [
        "cwd", "fgd", "fitnet", "logits_kd", "maskd", "rcnn_smoothl1", "retinanet_l1"
    ]  # fmt: skip


@pytest.fixture(scope="module")
def models():
    return detector("fcos", 0, FrozenBatchNorm2d), detector("fcos", 1)


def test_distiller_with_peer_terms_only(models) -> None:
    student, teacher = models
    specs = [
        {"kind": "fitnet", "student": FPN, "teacher": FPN, "weight": 2.0},
        {"kind": "cwd", "student": FPN, "teacher": FPN, "tau": 2.0},
        {"kind": "fgd", "student": FPN, "teacher": FPN, "detector": "fcos"},
    ]
    distiller = Distiller(student, teacher, specs).train()
    images, targets = detection_batch()
    losses = distiller(images, targets)
    assert [k for k in losses if k.startswith("loss_")] == ["loss_fitnet", "loss_cwd", "loss_fgd"]
    diag = {k: v for k, v in losses.items() if "/" in k}  # logged, never summed
    assert len([k for k in diag if k.startswith("fitnet/")]) == 5
    assert not any(v.requires_grad for v in diag.values())
    parts = [v for k, v in losses.items() if "/" not in k]
    assert len(parts) == 6  # FCOS's three task losses and the three terms
    torch.testing.assert_close(total_loss(losses), sum(parts))
    # the total is weight × the sum of the logged levels
    fitnet_levels = [v for k, v in diag.items() if k.startswith("fitnet/")]
    torch.testing.assert_close(losses["loss_fitnet"].detach(), 2.0 * sum(fitnet_levels))
    # the FitNet level value equals an independent computation on the same features
    with torch.no_grad():
        t_feats = teacher.backbone(teacher.transform(images, targets)[0].tensors)
    assert set(t_feats) == {"0", "1", "2", "p6", "p7"}
    total_loss(losses).backward()
    assert all(p.grad is not None for p in distiller.terms.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_distiller_term_level_matches_a_by_hand_fitnet(models) -> None:
    student, teacher = models
    term = FitNetTerm(FPN, FPN, align=False)
    distiller = Distiller(student, teacher, [term]).train()
    images, targets = detection_batch()
    losses = distiller(images, targets)
    with torch.no_grad():
        batch = teacher.transform(images, targets)[0].tensors
        t_feats, s_feats = teacher.backbone(batch), student.backbone(batch)
    for key, name in zip(["0", "1", "2", "p6", "p7"], term.levels, strict=True):
        expected = ((s_feats[key] - t_feats[key]) ** 2).mean()
        torch.testing.assert_close(losses[f"fitnet/{name}"], expected)


def test_levels_distil_only_the_named_levels(models) -> None:
    """A term's ``levels``: those levels' losses (by hand for FitNet), their token sets (MasKD)."""
    student, teacher = models
    images, targets = detection_batch()
    with torch.no_grad():
        batch = teacher.transform(images, targets)[0].tensors
        t_feats, s_feats = teacher.backbone(batch), student.backbone(batch)
    fitnet = FitNetTerm(FPN, FPN, align=False, levels=["p6", 0])
    losses = Distiller(student, teacher, [fitnet]).train()(images, targets)
    assert fitnet.levels == [f"{FPN}:0", f"{FPN}:p6"]  # output order, whatever the given order
    assert fitnet.level_index == [0, 3]
    assert sorted(k for k in losses if k.startswith("fitnet/")) == [f"fitnet/{FPN}:0",
                                                                   f"fitnet/{FPN}:p6"]  # fmt: skip
    expected = sum(((s_feats[k] - t_feats[k]) ** 2).mean() for k in ["0", "p6"])
    torch.testing.assert_close(losses["loss_fitnet"].detach(), expected)

    # MasKD on levels 1 and p7: the level values of the full term there, with their token sets
    torch.manual_seed(3)
    tokens = [ReceptiveTokens(256, 3, weighted=True) for _ in range(5)]
    for tok in tokens:
        nn.init.normal_(tok.mask_token, std=0.05)
    full = MaskdTerm(FPN, FPN, tokens, align=False)
    some = MaskdTerm(FPN, FPN, tokens, align=False, levels=["1", "p7"], name="some")
    out = Distiller(student, teacher, [full, some]).train()(images, targets)
    assert [k for k in out if k.startswith("some/")] == [f"some/{FPN}:1", f"some/{FPN}:p7"]
    for key in ["1", "p7"]:
        torch.testing.assert_close(out[f"some/{FPN}:{key}"], out[f"maskd/{FPN}:{key}"])
    torch.testing.assert_close(
        out["loss_some"].detach(), out[f"maskd/{FPN}:1"] + out[f"maskd/{FPN}:p7"]
    )
    assert len(some.loss.tokens) == 2 and len(some.connectors) == 2


def test_levels_errors_name_the_levels(models) -> None:
    student, teacher = models
    with pytest.raises(
        ValueError,
        match=r"fitnet term: levels \['p9'\] are not levels of teacher "
        r"layer 'backbone.fpn'; its levels are \['0', '1', '2', 'p6', 'p7'\]",
    ):
        Distiller(student, teacher, [FitNetTerm(FPN, FPN, levels=["0", "p9"])])  # fmt: skip
    with pytest.raises(ValueError, match=r"cwd term: levels \['0', '0'\] name a level twice"):
        build_term({"kind": "cwd", "student": FPN, "teacher": FPN, "levels": ["0", 0]})
    for bad in ["0", [], [1.5], [True]]:
        with pytest.raises(TypeError, match="fitnet term: levels must be"):
            FitNetTerm(FPN, FPN, levels=bad)
    layer = "backbone.body.layer4"
    with pytest.raises(ValueError, match=r"returns one tensor, not several levels"):
        Distiller(student, teacher, [FitNetTerm(layer, layer, levels=["0"])])


def test_distiller_rejects_repeated_names_and_channel_mismatch(models) -> None:
    student, teacher = models
    twice = [{"kind": "cwd", "student": FPN, "teacher": FPN}] * 2
    with pytest.raises(ValueError, match=r"term names \['cwd'\] are used twice"):
        Distiller(student, teacher, twice)
    named = [twice[0], {**twice[0], "name": "cwd_p", "tau": 4.0}]
    distiller = Distiller(student, teacher, named)
    assert [t.name for t in distiller.terms] == ["cwd", "cwd_p"]
    with pytest.raises(ValueError, match="align=false needs equal channels"):
        Distiller(
            student,
            teacher,
            [{"kind": "fitnet", "student": "backbone.body.layer2",
              "teacher": "backbone.fpn.inner_blocks.0", "align": False}],
        )  # fmt: skip
    with pytest.raises(TypeError, match="terms must be a list"):
        Distiller(student, teacher, None)  # type: ignore[arg-type]


def test_a_model_the_registry_does_not_build(models) -> None:
    """A hand-made segmenter: MasKD and a peer term on its logits, no package change."""
    from maskd.tasks import SegmentationTask

    class TinySeg(nn.Module):
        def __init__(self, width: int) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU())
            self.head = nn.Conv2d(width, 4, 1)

        def forward(self, x: Tensor) -> dict[str, Tensor]:
            return {"out": self.head(self.body(x))}

    torch.manual_seed(0)
    student, teacher = SegmentationTask(TinySeg(8), 4), SegmentationTask(TinySeg(16), 4)
    tokens = {"model.head": [ReceptiveTokens(4, 2)]}
    head = {"student": "model.head", "teacher": "model.head"}
    terms = [
        {"kind": "maskd", **head, "tokens": tokens, "align": False},
        {"kind": "logits_kd", **head, "tau": 2.0},
    ]
    distiller = Distiller(student, teacher, terms).train()
    images = torch.rand(2, 3, 16, 16)
    masks = torch.randint(0, 4, (2, 16, 16))
    losses = distiller(images, masks)
    assert {"loss_maskd", "loss_logits_kd"} <= set(losses)
    with torch.no_grad():
        s, t = student.model(images)["out"], teacher.model(images)["out"]
    torch.testing.assert_close(losses["loss_logits_kd"].detach(), pixel_kd_loss(s, t, 2.0))


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> dict[str, Path]:
    """Tiny synthetic detection and segmentation sets (64 px)."""
    from maskd.cli import main

    root = tmp_path_factory.mktemp("synthetic")
    for task, train in (("detection", 4), ("segmentation", 4)):
        args = ["data", "synth", "--out", str(root / task), "--task", task, "--train", str(train)]
        assert main([*args, "--val", "2", "--size", "64", "--preview", "0"]) == 0
    return {"root": root}


# kind -> (student = teacher registry model, its task, the term spec, FPN levels or logits)
KINDS = {
    "maskd": ("fcos_resnet18_fpn", {"weight": 0.5}, 5),
    "fitnet": ("fcos_resnet18_fpn", {"weight": 0.5}, 5),
    "cwd": ("fcos_resnet18_fpn", {"weight": 0.5, "tau": 2.0}, 5),
    "fgd": ("fcos_resnet18_fpn", {"weight": 0.5}, 5),
    "logits_kd": ("deeplabv3_resnet18", {"weight": 0.5, "tau": 2.0}, 1),
    "retinanet_l1": ("retinanet_resnet18_fpn", {"weight": 0.5}, 5),
    "rcnn_smoothl1": ("fasterrcnn_resnet18_fpn", {"weight": 0.5}, 0),
}


def distill_args(synthetic, model: str, tmp: Path) -> list[str]:
    """``maskd distill`` of a freshly initialised ``model`` from another, one step."""
    from maskd.models import build, task_of

    task = task_of(model)
    opts = {"min_size": 64, "max_size": 64} if task == "detection" else {}
    classes = 6 if task == "detection" else 7  # six shapes (+ background for segmentation)
    torch.manual_seed(0)
    teacher, _ = build(model, num_classes=classes, **opts)
    torch.save(teacher.state_dict(), tmp / "teacher.pt")
    data = ["--data.kind=coco"] if task == "detection" else ["--data.kind=folder", "--data.size=64"]
    return [
        "distill",
        f"--teacher.name={model}",
        f"--teacher.weights={tmp / 'teacher.pt'}",
        f"--student.name={model}",
        f"--student.options={json.dumps(opts)}",
        f"--teacher.options={json.dumps(opts)}",
        "--distill.tokens=null",
        *data,
        f"--data.root={synthetic['root'] / task}",
        "--data.batch_size=2",
        "--trainer.max_steps=1",
        "--trainer.log_every_n_steps=1",
        "--trainer.accelerator=cpu",
        "--trainer.progress_bar=false",
        "--run.validate=false",
    ]


@pytest.mark.parametrize("kind", list(KINDS))
def test_distill_command_runs_every_term_kind(kind, synthetic, tmp_path) -> None:
    """``maskd distill`` with each term kind alone on synthetic data: logged and summed."""
    from maskd.cli import main
    from maskd.token_io import save_tokens

    model, options, levels = KINDS[kind]
    spec = {"kind": kind, **options}
    if kind == "maskd":  # weighted tokens, the head unused: the option reaches the term
        tokens = [ReceptiveTokens(256, 2, weighted=True) for _ in range(5)]
        save_tokens(tmp_path / "tokens.pt", {FPN: tokens})
        spec.update(tokens=str(tmp_path / "tokens.pt"), token_weights="equal")
    out = tmp_path / "run"
    args = distill_args(synthetic, model, tmp_path)
    assert main([*args, f"--distill.terms={json.dumps([spec])}", f"--run.out={out}"]) == 0
    log = next((out / "csv").glob("version_*/metrics.csv"))
    row = next(r for r in csv.DictReader(log.open()) if r.get(f"train/loss_{kind}"))
    values = {
        k.removeprefix("train/"): float(v) for k, v in row.items() if v and k.startswith("train/")
    }
    per_level = [v for k, v in values.items() if k.startswith(f"{kind}/")]
    assert len(per_level) == levels
    if levels:  # weight x the sum of the logged levels
        assert values[f"loss_{kind}"] == pytest.approx(0.5 * sum(per_level), rel=1e-5)
    assert values[f"loss_{kind}"] > 0
    # the logged total is every logged loss but the per-level values
    parts = [v for k, v in values.items() if k != "loss" and "/" not in k]
    assert len(parts) >= 2 and values["loss"] == pytest.approx(sum(parts), rel=1e-5)


def test_distill_command_names_the_valid_kinds_options_and_layers(synthetic, tmp_path, capsys):
    from maskd.cli import main
    from maskd.token_io import save_tokens

    args = distill_args(synthetic, "fcos_resnet18_fpn", tmp_path)
    tokens = str(tmp_path / "tokens.pt")
    save_tokens(tokens, {FPN: [ReceptiveTokens(256, 2, weighted=True) for _ in range(5)]})
    for spec, needle in [
        ({"kind": "bogus"}, "distill.terms[0]: unknown distillation term kind 'bogus'; valid "
                            "kinds: ['cwd', 'fgd', 'fitnet', 'logits_kd', 'maskd'"),
        ({"kind": "cwd", "temp": 2}, "cwd term: unknown options ['temp']; valid options: "
                                     "['align', 'levels', 'name', 'resize', 'student', 'tau', 'teacher',"),
        ({"kind": "fitnet", "teacher": "backbone.fnp"}, "unknown layer 'backbone.fnp' in FCOS; "
                                                        "closest valid names: ['backbone.fpn'"),
        ({"kind": "retinanet_l1"}, "retinanet_l1 term needs a torchvision RetinaNet student, got "
                                   "FCOS"),
        ({"kind": "maskd", "tokens": tokens, "token_weights": "mean"},
         "maskd term: token_weights must be 'head' or 'equal', got 'mean'"),
    ]:  # fmt: skip
        out = tmp_path / "bad"
        code = main([*args, f"--distill.terms={json.dumps([spec])}", f"--run.out={out}"])
        err = capsys.readouterr().err
        assert code == 1 and needle in err, err
        assert len(err.strip().splitlines()) == 1 and not (out / "checkpoints").exists()


# ---- the options of maskd distill as terms -----------------------------------------------
def terms_of(pairs=None, task="detection", student="retinanet_resnet50_fpn", **options):
    from maskd.engine.jobs import DistillArgs, distill_terms

    args = DistillArgs(**options)
    return distill_terms(args, task, student, {FPN: FPN} if pairs is None else pairs)


def test_token_files_checked_are_the_ones_the_terms_read(tmp_path: Path) -> None:
    """check_token_files reads distill.tokens exactly where distill_terms does: for the
    shorthand (no maskd entry), and for maskd entries that name no file."""
    from maskd.engine.jobs import DistillArgs, check_token_files

    have, gone = tmp_path / "t.pt", str(tmp_path / "gone.pt")
    have.write_bytes(b"")
    maskd_own = {"kind": "maskd", "tokens": str(have)}
    cases = [  # (options, the option named in the error, or None: passes)
        ({"tokens": gone}, "distill.tokens"),
        ({"tokens": gone, "terms": [{"kind": "cwd"}]}, "distill.tokens"),  # shorthand + CWD
        ({"tokens": gone, "terms": [maskd_own]}, None),  # the entry's own file only
        ({"tokens": gone, "terms": [maskd_own, {"kind": "maskd"}]}, "distill.tokens"),
        (
            {"tokens": None, "terms": [{"kind": "cwd"}, {"kind": "maskd", "tokens": gone}]},
            "distill.terms[1].tokens",
        ),
        ({"tokens": str(have)}, None),
    ]
    for options, key in cases:
        args = DistillArgs(**options)
        if key is None:
            check_token_files(args, "detection", "fcos_resnet18_fpn")
            continue
        with pytest.raises(FileNotFoundError, match=rf"^{re.escape(key)}: no such token file"):
            check_token_files(args, "detection", "fcos_resnet18_fpn")


def test_each_shorthand_option_becomes_its_term_option() -> None:
    base = {"kind": "maskd", "student": FPN, "teacher": FPN, "tokens": "t.pt", "weight": 1.0,
            "align": True, "eps": 0.0, "custom_mask_warmup": None}  # fmt: skip
    assert terms_of(tokens="t.pt") == [base]
    for option, value, term_option, term_value in [
        ("loss_weight", 7.0, "weight", 7.0),
        ("custom_mask_warmup", 7000, "custom_mask_warmup", 7000),
        ("align", False, "align", False),
        ("eps", 1e-5, "eps", 1e-5),
        ("resize", True, "resize", True),
        ("levels", {FPN: ["0", "1"]}, "levels", ["0", "1"]),
        ("token_weights", "equal", "token_weights", "equal"),
    ]:
        assert terms_of(tokens="t.pt", **{option: value}) == [{**base, term_option: term_value}]
    head = {"kind": "retinanet_l1", "weight": 1.0}
    assert terms_of(tokens="t.pt", head_kd="auto") == [base, head]
    assert terms_of(tokens="t.pt", head_kd="retinanet_l1", head_kd_weight=2.0) == [
        base, {**head, "weight": 2.0}
    ]  # fmt: skip
    assert terms_of(tokens=None, head_kd="auto", student="fasterrcnn_resnet18_fpn") == [
        {"kind": "rcnn_smoothl1", "weight": 1.0}
    ]
    # the authors' segmentation setting: the auxiliary logits with the main logits' tokens
    main, aux = "model.classifier.4", "model.aux_classifier.4"
    seg = terms_of({main: main, aux: aux}, "segmentation", "deeplabv3_resnet18", tokens="t.pt",
                   reuse_tokens={aux: main}, layer_weights={aux: 0.4}, loss_weight=0.5)  # fmt: skip
    layers = {"student": main, "teacher": main}
    assert seg == [
        {**base, **layers, "weight": 0.5},
        {**base, "student": aux, "teacher": aux, "name": "maskd_2", "weight": 0.5,
         "tokens_from": main, "level_weights": 0.4},
    ]  # fmt: skip
    # terms: after the shorthand MasKD term, layers from the first pair; none with tokens null
    peer = {"kind": "cwd", "tau": 2.0}
    assert terms_of(tokens="t.pt", terms=[peer]) == [base, {"student": FPN, "teacher": FPN, **peer}]
    assert terms_of(tokens=None, terms=[peer], resize=True) == [
        {"student": FPN, "teacher": FPN, **peer, "resize": True}
    ]
    # an explicit maskd term replaces the shorthand and takes distill.tokens unless it names a file
    explicit = {"kind": "maskd", "weight": 7.0, "custom_mask_warmup": 7000}
    assert terms_of(tokens="t.pt", terms=[explicit]) == [
        {"student": FPN, "teacher": FPN, **explicit, "tokens": "t.pt"}
    ]
    own = {**explicit, "student": "a", "teacher": "b", "tokens": "other.pt"}
    assert terms_of(tokens="t.pt", terms=[own]) == [own]


def test_bad_distill_options_are_one_line_errors_naming_the_choices() -> None:
    from maskd.engine.jobs import ConfigError

    cases = [
        (dict(terms=[{"kind": "kd"}]), r"distill.terms\[0\]: unknown distillation term kind "
         r"'kd'; valid kinds: \['cwd', 'fgd', 'fitnet', 'logits_kd', 'maskd', 'rcnn_smoothl1', "
         r"'retinanet_l1'\]"),
        (dict(terms=[{"kind": "maskd", "weigth": 2}]), r"maskd term: unknown options "
         r"\['weigth'\]; valid options: \['align', 'custom_mask_warmup', 'eps', "),
        (dict(terms=["cwd"]), r"distill.terms\[0\]: a distillation term must be a mapping"),
        (dict(terms=[{"kind": "fgd"}], task="segmentation"), "fgd needs a detector"),
        (dict(terms=[{"kind": "rcnn_smoothl1"}], task="segmentation"),
         "rcnn_smoothl1 needs a detector"),
        (dict(head_kd="auto", student="fcos_resnet50_fpn"), r"head_kd 'auto': no head term for "
         r"'fcos_resnet50_fpn'; head KD exists for RetinaNet \(retinanet_l1\) and Faster R-CNN "
         r"\(rcnn_smoothl1\)"),
        (dict(head_kd="auto", task="segmentation"), "head_kd 'auto' needs a detector"),
        (dict(tokens="t.pt", reuse_tokens={"nope": FPN}), r"distill.reuse_tokens names "
         r"\['nope'\], which are not distilled teacher layers \['backbone.fpn'\]"),
        (dict(tokens="t.pt", layer_weights={"nope": 0.4}), r"distill.layer_weights names"),
        (dict(tokens="t.pt", levels={"nope": ["0"]}), r"distill.levels names \['nope'\]"),
        (dict(tokens="t.pt", loss_weight=7.0, terms=[{"kind": "maskd"}]),
         r"distill.loss_weight is shorthand for the MasKD terms .* set its options there"),
        (dict(tokens=None, terms=[{"kind": "maskd"}]), "the maskd term needs tokens"),
        (dict(tokens="t.pt", terms=[{"kind": "maskd", "tokens": 3}]), "tokens must be a token "
         "file path"),
        (dict(tokens=None), "nothing to distil"),
    ]  # fmt: skip
    for options, message in cases:
        with pytest.raises(ConfigError, match=message) as err:
            terms_of(**options)
        assert "\n" not in str(err.value)


OVERLAYS = sorted(
    p for p in (Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml") if p.stem in TERMS
)


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_peer_configs_parse_over_their_distill_config(overlay, capsys) -> None:
    import yaml

    from maskd.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["distill", "--config", str(overlay.parent / "distill.yaml"), "--config",
              str(overlay), "--print_config"])  # fmt: skip
    assert exc.value.code == 0
    distill = yaml.safe_load(capsys.readouterr().out)["distill"]
    assert distill["tokens"] is None and distill["terms"]
    for spec in distill["terms"]:
        assert spec["kind"] == overlay.stem
        build_term(spec)  # valid kind and options
