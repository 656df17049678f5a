"""Tests for the head-output terms of stage 2 (retinanet_l1, rcnn_smoothl1), through
maskd.Distiller."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.ops import FrozenBatchNorm2d

from maskd.distiller import Distiller, total_loss
from maskd.taps import RESIZE
from maskd.tokens import ReceptiveTokens
from tiny_detectors import detection_batch, snapshot
from tiny_detectors import detector as tiny_detector

FPN = "backbone.fpn"
FPN_LEVELS = {"fasterrcnn": 5, "retinanet": 5, "fcos": 5}


def detector(kind: str, seed: int, teacher: bool = False) -> nn.Module:
    """Teachers keep real BatchNorm (frozen in eval by the distiller); students FrozenBN."""
    return tiny_detector(kind, seed, nn.BatchNorm2d if teacher else FrozenBatchNorm2d)


def tokens(kind: str) -> dict[str, list[ReceptiveTokens]]:
    torch.manual_seed(7)
    return {"backbone.fpn": [ReceptiveTokens(256, 2) for _ in range(FPN_LEVELS[kind])]}


def maskd(kind: str) -> dict[str, Any]:
    return {"kind": "maskd", "student": FPN, "teacher": FPN, "tokens": tokens(kind)}


def pair(kind: str) -> tuple[nn.Module, nn.Module]:
    return detector(kind, 1), detector(kind, 0, teacher=True)


def count_calls(module: nn.Module) -> list[int]:
    calls = [0]

    def hook(*_: object) -> None:
        calls[0] += 1

    module.register_forward_hook(hook)
    return calls


def no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_retinanet_l1_matches_per_level_l1_computed_by_hand() -> None:
    student, teacher = pair("retinanet")
    before = snapshot(teacher)
    distiller = Distiller(
        student, teacher, [maskd("retinanet"), {"kind": "retinanet_l1", "weight": 2.0}]
    ).train()
    images, targets = detection_batch()
    losses = distiller(images, targets)
    assert no_hooks(student) and no_hooks(teacher)  # nothing outlives the forward
    levels = [f"retinanet_l1/backbone:{k}" for k in ("0", "1", "2", "p6", "p7")]
    assert [k for k in losses if "maskd" not in k] == [
        "classification", "bbox_regression", "loss_retinanet_l1", *levels
    ]  # fmt: skip
    teacher_cls = count_calls(teacher.head.classification_head)
    distiller(images, targets)
    assert teacher_cls[0] == 0  # only the teacher's regression branch runs

    # By hand: both regression heads on their own FPN features, one L1 mean per FPN level.
    with torch.no_grad():
        t_feats = list(teacher.backbone(teacher.transform(images)[0].tensors).values())
        t_reg = teacher.head.regression_head(t_feats)
    s_feats = list(student.backbone(student.transform(images, targets)[0].tensors).values())
    s_reg = student.head.regression_head(s_feats)
    anchors = student.anchor_generator.num_anchors_per_location()[0]
    splits = [f.shape[-2] * f.shape[-1] * anchors for f in s_feats]
    assert sum(splits) == s_reg.shape[1] and s_reg.shape == t_reg.shape
    per_level = [
        F.l1_loss(s, t) for s, t in zip(s_reg.split(splits, 1), t_reg.split(splits, 1), strict=True)
    ]
    expected = 2.0 * sum(per_level)
    torch.testing.assert_close(losses["loss_retinanet_l1"], expected)
    for key, value in zip(levels, per_level, strict=True):  # logged, unweighted, detached
        torch.testing.assert_close(losses[key], value.detach())
        assert not losses[key].requires_grad
    overall = 2.0 * F.l1_loss(s_reg, t_reg)  # one mean over all levels: not the authors' form
    assert not math.isclose(float(expected.detach()), float(overall.detach()), rel_tol=1e-3)

    # Gradients: the student's head gets exactly the hand computation's; the teacher none.
    weight = student.head.regression_head.bbox_reg.weight
    (got,) = torch.autograd.grad(losses["loss_retinanet_l1"], weight, retain_graph=True)
    (want,) = torch.autograd.grad(expected, weight)
    torch.testing.assert_close(got, want)
    assert got.abs().sum() > 0
    cls_weight = student.head.classification_head.cls_logits.weight
    (none,) = torch.autograd.grad(losses["loss_retinanet_l1"], cls_weight, allow_unused=True)
    assert none is None or not none.any()
    opt = torch.optim.SGD(distiller.trainable_parameters(), lr=0.01)
    total_loss(losses).backward()
    opt.step()
    assert all(p.grad is None for p in teacher.parameters())
    after = snapshot(teacher)
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_rcnn_smoothl1_runs_the_teachers_roi_head_on_the_students_proposals() -> None:
    student, teacher = pair("fasterrcnn")
    distiller = Distiller(student, teacher, [maskd("fasterrcnn"), {"kind": "rcnn_smoothl1"}])
    seen: dict[str, Any] = {}

    def record(key: str, pick: Callable[..., Any]) -> Callable[..., None]:
        def hook(*args: Any) -> None:
            assert key not in seen
            seen[key] = pick(*args)

        return hook

    handles = [
        student.roi_heads.box_roi_pool.register_forward_pre_hook(
            record("student", lambda m, args: (args[1], args[2]))
        ),
        student.roi_heads.box_predictor.register_forward_hook(
            record("student_reg", lambda m, i, out: out[1])
        ),
        teacher.roi_heads.box_roi_pool.register_forward_pre_hook(
            record("teacher", lambda m, args: args[1])
        ),
    ]
    teacher_rpn = count_calls(teacher.rpn)
    images, targets = detection_batch()
    distiller.train()
    losses = distiller(images, targets)
    assert [k for k in losses if k.startswith("loss_")][-2:] == ["loss_maskd", "loss_rcnn_smoothl1"]
    assert teacher_rpn[0] == 0  # the teacher never proposes boxes of its own
    for handle in handles:
        handle.remove()

    proposals, sizes = seen["student"]
    # The student's sampled training proposals: 32 per image, its ground-truth box among them.
    assert [len(p) for p in proposals] == [32, 32]
    for props, target in zip(proposals, targets, strict=True):
        assert (props == target["boxes"]).all(dim=1).any()
    assert all(torch.equal(t, s) for t, s in zip(seen["teacher"], proposals, strict=True))

    # By hand: the teacher's RoI head on its own FPN features with the student's proposals.
    with torch.no_grad():
        feats = teacher.backbone(teacher.transform(images)[0].tensors)
        heads = teacher.roi_heads
        box_feats = heads.box_head(heads.box_roi_pool(feats, proposals, sizes))
        t_reg = heads.box_predictor(box_feats)[1]
    s_reg = seen["student_reg"]
    assert s_reg.shape == t_reg.shape == (64, 3 * 4)  # 2 classes + background
    expected = F.smooth_l1_loss(s_reg[:, 4:], t_reg[:, 4:], beta=1.0)
    torch.testing.assert_close(losses["loss_rcnn_smoothl1"], expected)
    assert not torch.allclose(expected, F.smooth_l1_loss(s_reg, t_reg, beta=1.0))
    # Other proposals would give another value: the term really depends on the student's.
    with torch.no_grad():
        shifted = [p + 3.0 for p in proposals]
        other = heads.box_predictor(heads.box_head(heads.box_roi_pool(feats, shifted, sizes)))[1]
    assert not torch.allclose(expected, F.smooth_l1_loss(s_reg[:, 4:], other[:, 4:]))

    # Gradients reach the student's box regression (never its background rows) and backbone.
    bbox_pred = student.roi_heads.box_predictor.bbox_pred.weight
    conv = student.backbone.body.layer4[0].conv1.weight
    g_pred, g_conv = torch.autograd.grad(
        losses["loss_rcnn_smoothl1"], [bbox_pred, conv], retain_graph=True
    )
    assert g_pred[4:].abs().sum() > 0 and not g_pred[:4].any()
    assert g_conv.abs().sum() > 0
    total_loss(losses).backward()
    assert all(p.grad is None for p in teacher.parameters())


HEADS = {"retinanet": "retinanet_l1", "fasterrcnn": "rcnn_smoothl1"}


@pytest.mark.parametrize("kind", list(HEADS))
def test_head_term_off_leaves_the_loss_dict_as_before(kind: str) -> None:
    student, teacher = pair(kind)
    off = Distiller(student, teacher, [maskd(kind)])
    on = Distiller(student, teacher, [maskd(kind), {"kind": HEADS[kind]}])
    on.terms[0].load_state_dict(off.terms[0].state_dict())
    # The head term adds the teacher's whole FPN dict (its backbone output) to what it records.
    assert list(off._teacher_recorder.records) == [FPN, RESIZE]
    assert list(on._teacher_recorder.records) == [FPN, f"{HEADS[kind]}/features", RESIZE]
    images, targets = detection_batch()
    torch.manual_seed(3)
    plain = off.train()(images, targets)
    torch.manual_seed(3)
    with_kd = on.train()(images, targets)
    assert list(plain) == [k for k in with_kd if not k.split("/")[0].endswith(HEADS[kind])]
    assert f"loss_{HEADS[kind]}" in with_kd
    for key, value in plain.items():
        torch.testing.assert_close(with_kd[key], value, rtol=0, atol=0)


def test_eval_never_runs_the_teacher_with_a_head_term() -> None:
    student, teacher = pair("retinanet")
    distiller = Distiller(student, teacher, [maskd("retinanet"), {"kind": "retinanet_l1"}])
    teacher_calls = count_calls(teacher)
    distiller.eval()
    images, _ = detection_batch()
    preds = distiller(images)
    assert teacher_calls[0] == 0 and isinstance(preds, list) and len(preds) == 2


class TinySegmenter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.b = nn.Conv2d(3, 4, 3, 2, 1)

    def forward(self, images: Tensor, targets: Tensor | None = None) -> object:
        out = self.b(images)
        return {"loss_seg": out.pow(2).mean()} if self.training else out


def test_unsupported_models_fail_clearly() -> None:
    seg = TinySegmenter(), TinySegmenter()
    with pytest.raises(ValueError, match=r"rcnn_smoothl1 term needs a torchvision FasterRCNN "
                       r"student, got TinySegmenter; head KD exists for RetinaNet"):  # fmt: skip
        Distiller(*seg, [{"kind": "rcnn_smoothl1"}])
    fcos, retina = detector("fcos", 1), detector("retinanet", 0)
    with pytest.raises(ValueError, match=r"needs a torchvision RetinaNet student, got FCOS"):
        Distiller(fcos, retina, [{"kind": "retinanet_l1"}])
    with pytest.raises(ValueError, match=r"needs a torchvision RetinaNet teacher, got FCOS"):
        Distiller(retina, fcos, [{"kind": "retinanet_l1"}])
    for weight, err in ((-1.0, ValueError), (float("nan"), ValueError), ("1", TypeError)):
        with pytest.raises(err, match="retinanet_l1 term: weight must be"):
            Distiller(
                retina, detector("retinanet", 2), [{"kind": "retinanet_l1", "weight": weight}]
            )

    other = detector("retinanet", 2)
    other.anchor_generator.sizes = tuple((s[0] * 2,) for s in other.anchor_generator.sizes)
    with pytest.raises(ValueError, match="anchor generators differ"):
        Distiller(retina, other, [{"kind": "retinanet_l1"}])
    rcnn_s, rcnn_t = detector("fasterrcnn", 1), detector("fasterrcnn", 0)
    rcnn_t.roi_heads.box_predictor = FastRCNNPredictor(1024, 6)
    with pytest.raises(ValueError, match=r"same box predictor outputs.*\(3, 12\).*\(6, 24\)"):
        Distiller(rcnn_s, rcnn_t, [{"kind": "rcnn_smoothl1"}])


def test_distill_command_line_takes_the_options(capsys) -> None:
    from maskd.cli import main

    config = str(
        Path(__file__).resolve().parents[1] / "configs/coco/retinanet_r101_r50/distill.yaml"
    )
    with pytest.raises(SystemExit) as exc:
        main(["distill", "--config", config, "--print_config"])
    assert exc.value.code == 0
    terms = yaml.safe_load(capsys.readouterr().out)["distill"]["terms"]
    assert {"kind": "retinanet_l1", "weight": 1.0} in terms  # the head term, as a list entry
    assert main(["distill", "--config", config, "--distill.head_kd", "bogus"]) == 2
    assert "distill.head_kd" in capsys.readouterr().err


def test_run_distill_builds_the_terms_and_rejects_segmenters(tmp_path, monkeypatch) -> None:
    from maskd.engine import jobs
    from maskd.engine.config import DataArgs, ModelArgs
    from maskd.engine.optim import OptimSpec
    from maskd.engine.trainer import TrainerSpec

    weights = tmp_path / "teacher.pt"
    weights.write_bytes(b"")
    tokens_file = tmp_path / "tokens.pt"
    tokens_file.write_bytes(b"")
    rest = (DataArgs(), OptimSpec(), TrainerSpec(), jobs.RunArgs(out=str(tmp_path / "run")))
    seg = (
        ModelArgs(name="deeplabv3_resnet18"),
        ModelArgs("deeplabv3_resnet18", weights=str(weights)),
    )
    with pytest.raises(jobs.ConfigError, match=r"head_kd 'auto' needs a detector"):
        jobs.run_distill(*seg, jobs.DistillArgs(tokens=str(tokens_file), head_kd="auto"), *rest)

    seen: list[Any] = []

    class Stop(Exception):
        pass

    def fake_distiller(student: nn.Module, teacher: nn.Module, terms: list, **cache) -> None:
        assert cache == {"teacher_cache": None, "teacher_cache_bytes": 4 * 2**30,
                         "teacher_cache_dir": None}  # fmt: skip
        seen.extend(terms)
        raise Stop

    monkeypatch.setattr(jobs, "build_data", lambda *a, **k: (None, 3))
    monkeypatch.setattr(jobs, "build_model", lambda *a, **k: (nn.Identity(), ["l"], "detection"))
    monkeypatch.setattr(jobs, "load_token_file", lambda *a, **k: {"l": ["tok"]})
    monkeypatch.setattr("maskd.distiller.Distiller", fake_distiller)
    det = (
        ModelArgs("retinanet_resnet18_fpn"),
        ModelArgs("retinanet_resnet18_fpn", weights=str(weights)),
    )
    args = jobs.DistillArgs(tokens=str(tokens_file), head_kd="auto", head_kd_weight=0.5)
    with pytest.raises(Stop):
        jobs.run_distill(*det, args, *rest)
    assert seen == [
        {"kind": "maskd", "student": "l", "teacher": "l", "tokens": {"l": ["tok"]},
         "weight": 1.0, "align": True, "eps": 0.0, "custom_mask_warmup": None},
        {"kind": "retinanet_l1", "weight": 0.5},
    ]  # fmt: skip


def test_distill_command_runs_detection_with_head_kd_end_to_end(tmp_path) -> None:
    """``maskd distill`` on a synthetic COCO set: the head-KD term is logged and trains."""
    import csv

    from maskd.cli import main
    from maskd.models import build
    from maskd.token_io import save_tokens

    data = tmp_path / "data"
    synth = ["data", "synth", "--out", str(data), "--task", "detection", "--train", "4"]
    assert main([*synth, "--val", "2", "--size", "64", "--preview", "0"]) == 0
    opts = {"min_size": 64, "max_size": 64}
    teacher, layers = build("retinanet_resnet18_fpn", num_classes=6, **opts)
    torch.save(teacher.state_dict(), tmp_path / "teacher.pt")
    save_tokens(tmp_path / "tokens.pt", {layers[0]: [ReceptiveTokens(256, 2) for _ in range(5)]})
    args = [
        "distill",
        "--teacher.name=retinanet_resnet18_fpn",
        f"--teacher.weights={tmp_path / 'teacher.pt'}",
        "--student.name=retinanet_resnet18_fpn",
        f"--student.options={json.dumps(opts)}",
        f"--teacher.options={json.dumps(opts)}",
        f"--distill.tokens={tmp_path / 'tokens.pt'}",
        "--distill.head_kd=auto",
        "--distill.head_kd_weight=2.0",
        "--data.kind=coco",
        f"--data.root={data}",
        "--data.batch_size=2",
        "--trainer.max_steps=2",
        "--trainer.log_every_n_steps=1",
        "--trainer.accelerator=cpu",
        "--trainer.progress_bar=false",
        f"--run.out={tmp_path / 'run'}",
    ]
    assert main(args) == 0
    log = next((tmp_path / "run" / "csv").glob("version_*/metrics.csv"))
    rows = [r for r in csv.DictReader(log.open()) if r.get("train/loss_retinanet_l1")]
    assert len(rows) == 2
    assert all(float(r["train/loss_retinanet_l1"]) > 0 for r in rows)
    # the logged total is the sum of every logged loss, the head term included
    terms = ("classification", "bbox_regression", "loss_maskd", "loss_retinanet_l1")
    for r in rows:
        parts = sum(float(r[f"train/{k}"]) for k in terms)
        assert abs(parts - float(r["train/loss"])) < 1e-4 * max(1.0, abs(parts))
        levels = [float(v) for k, v in r.items() if v and k.startswith("train/retinanet_l1/")]
        assert len(levels) == 5
        assert abs(2.0 * sum(levels) - float(r["train/loss_retinanet_l1"])) < 1e-5
