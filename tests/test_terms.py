"""Tests for the peer distillation terms (FitNet, CWD, FGD, logits KD) and their use in stage 2.

Each loss is checked against a literal float64 computation written here from the paper's
formula (values and gradients), and on hand-made cases whose answer is known.
"""

from __future__ import annotations

import copy
import csv
import itertools
import json
import math
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torchvision.ops import FrozenBatchNorm2d

from maskd.distiller import Distiller
from maskd.terms import (
    TERMS,
    FGDTerm,
    FitNetTerm,
    TermContext,
    build_term,
    channel_wise_divergence,
    fgd_attention,
    fgd_masks,
    fitnet_loss,
    pixel_kd_loss,
)
from maskd.terms.fgd import FGD_DEFAULTS
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


# ---- specs and the Distiller ----------------------------------------------------------------
def test_build_term_errors_name_the_valid_choices() -> None:
    with pytest.raises(ValueError, match=r"unknown distillation term kind 'kd'; valid kinds: \["):
        build_term({"kind": "kd", "student": FPN, "teacher": FPN})
    with pytest.raises(ValueError, match=r"cwd term: unknown options \['temp'\]; valid options"):
        build_term({"kind": "cwd", "student": FPN, "teacher": FPN, "temp": 2})
    with pytest.raises(ValueError, match="tau must be a number > 0"):
        build_term({"kind": "cwd", "student": FPN, "teacher": FPN, "tau": 0})
    with pytest.raises(ValueError, match="detector must be one of"):
        build_term({"kind": "fgd", "student": FPN, "teacher": FPN, "detector": "yolo"})
    with pytest.raises(ValueError, match="weight must be finite and >= 0"):
        build_term({"kind": "fitnet", "student": FPN, "teacher": FPN, "weight": float("nan")})
    with pytest.raises(ValueError, match="teacher layer path missing"):
        build_term({"kind": "fitnet", "student": FPN})
    assert sorted(TERMS) == ["cwd", "fgd", "fitnet", "logits_kd"]


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
    distiller = Distiller(student, teacher, None, None, terms=specs).train()
    images, targets = detection_batch()
    losses = distiller(images, targets)
    assert [k for k in losses if k.startswith("loss_")] == ["loss_fitnet", "loss_cwd", "loss_fgd"]
    assert not any("/" in k for k in losses)  # per-level values are logged, never summed
    diag = distiller.last_level_losses
    assert len([k for k in diag if k.startswith("fitnet/")]) == 5
    # the total is weight × the sum of the logged levels
    fitnet_levels = [v for k, v in diag.items() if k.startswith("fitnet/")]
    torch.testing.assert_close(losses["loss_fitnet"].detach(), 2.0 * sum(fitnet_levels))
    # the FitNet level value equals an independent computation on the same features
    with torch.no_grad():
        t_feats = teacher.backbone(teacher.transform(images, targets)[0].tensors)
    assert set(t_feats) == {"0", "1", "2", "p6", "p7"}
    sum(v for k, v in losses.items() if k.startswith("loss")).backward()
    assert all(p.grad is not None for p in distiller.terms.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_distiller_term_level_matches_a_by_hand_fitnet(models) -> None:
    student, teacher = models
    term = FitNetTerm(FPN, FPN, align=False)
    distiller = Distiller(student, teacher, None, None, terms=[term]).train()
    images, targets = detection_batch()
    distiller(images, targets)
    with torch.no_grad():
        batch = teacher.transform(images, targets)[0].tensors
        t_feats, s_feats = teacher.backbone(batch), student.backbone(batch)
    for key, name in zip(["0", "1", "2", "p6", "p7"], term.levels, strict=True):
        expected = ((s_feats[key] - t_feats[key]) ** 2).mean()
        torch.testing.assert_close(distiller.last_level_losses[f"fitnet/{name}"], expected)


def test_distiller_rejects_repeated_names_and_channel_mismatch(models) -> None:
    student, teacher = models
    twice = [{"kind": "cwd", "student": FPN, "teacher": FPN}] * 2
    with pytest.raises(ValueError, match=r"term names \['cwd'\] are used twice"):
        Distiller(student, teacher, None, None, terms=twice)
    named = [twice[0], {**twice[0], "name": "cwd_p", "tau": 4.0}]
    distiller = Distiller(student, teacher, None, None, terms=named)
    assert [t.name for t in distiller.terms] == ["cwd", "cwd_p"]
    with pytest.raises(ValueError, match="align=false needs equal channels"):
        Distiller(
            student,
            teacher,
            None,
            None,
            terms=[{"kind": "fitnet", "student": "backbone.body.layer2",
                    "teacher": "backbone.fpn.inner_blocks.0", "align": False}],
        )  # fmt: skip
    with pytest.raises(TypeError, match="give pairs and tokens"):
        Distiller(student, teacher, None, None)


def test_a_model_the_registry_does_not_build(models) -> None:
    """A hand-made segmenter: MasKD and a peer term on its logits, no package change."""
    from maskd.tasks import SegmentationTask
    from maskd.tokens import ReceptiveTokens

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
    terms = [{"kind": "logits_kd", "student": "model.head", "teacher": "model.head", "tau": 2.0}]
    distiller = Distiller(
        student, teacher, {"model.head": "model.head"}, tokens, align=False, terms=terms
    ).train()
    images = torch.rand(2, 3, 16, 16)
    masks = torch.randint(0, 4, (2, 16, 16))
    losses = distiller(images, masks)
    assert {"loss_maskd", "loss_logits_kd"} <= set(losses)
    with torch.no_grad():
        s, t = student.model(images)["out"], teacher.model(images)["out"]
    torch.testing.assert_close(losses["loss_logits_kd"].detach(), pixel_kd_loss(s, t, 2.0))


def test_distill_command_runs_every_peer_term(tmp_path) -> None:
    """``maskd distill`` with each peer term alone on synthetic COCO data: logged, summed."""
    from maskd.cli import main
    from maskd.models import build

    data = tmp_path / "data"
    synth = ["data", "synth", "--out", str(data), "--task", "detection", "--train", "4"]
    assert main([*synth, "--val", "2", "--size", "64", "--preview", "0"]) == 0
    opts = {"min_size": 64, "max_size": 64}
    teacher, _ = build("fcos_resnet18_fpn", num_classes=6, **opts)
    torch.save(teacher.state_dict(), tmp_path / "teacher.pt")
    base = [
        "distill",
        "--teacher.name=fcos_resnet18_fpn",
        f"--teacher.weights={tmp_path / 'teacher.pt'}",
        "--student.name=fcos_resnet18_fpn",
        f"--student.options={json.dumps(opts)}",
        f"--teacher.options={json.dumps(opts)}",
        "--distill.tokens=null",
        "--data.kind=coco",
        f"--data.root={data}",
        "--data.batch_size=2",
        "--trainer.max_steps=1",
        "--trainer.log_every_n_steps=1",
        "--trainer.accelerator=cpu",
        "--trainer.progress_bar=false",
    ]
    for kind in ("fitnet", "cwd", "fgd"):
        out = tmp_path / kind
        spec = json.dumps([{"kind": kind, "weight": 0.5}])
        assert main([*base, f"--distill.terms={spec}", f"--run.out={out}"]) == 0, kind
        log = next((out / "csv").glob("version_*/metrics.csv"))
        row = next(r for r in csv.DictReader(log.open()) if r.get(f"train/loss_{kind}"))
        levels = [float(v) for k, v in row.items() if v and k.startswith(f"train/{kind}/")]
        assert len(levels) == 5
        assert abs(float(row[f"train/loss_{kind}"]) - 0.5 * sum(levels)) < 1e-4
        parts = ("classification", "bbox_regression", "bbox_ctrness", f"loss_{kind}")
        total = sum(float(row[f"train/{p}"]) for p in parts)
        assert abs(total - float(row["train/loss"])) < 1e-4 * max(1.0, total)
    bad = json.dumps([{"kind": "bogus"}])
    assert main([*base, f"--distill.terms={bad}", f"--run.out={tmp_path / 'bad'}"]) == 1
    assert not (tmp_path / "bad" / "checkpoints").exists()


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
