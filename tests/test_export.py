"""``maskd export``: the exported state dict loads into torchvision's own builders (no maskd
code on the loading side) and into the registry model, with identical outputs."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from maskd.export import export_checkpoint, torchvision_call
from maskd.models import build

K = 3  # foreground classes (detection) / classes (segmentation)


def _fake_checkpoint(path, model, meta_model, prefix="net.", job="train"):
    """What a Lightning checkpoint of ``maskd train`` / ``distill`` holds for export."""
    state = {f"{prefix}{k}": v for k, v in model.state_dict().items()}
    if prefix == "net.student.":
        state["net.teacher.some.weight"] = torch.zeros(1)  # other entries are ignored
    meta = {"job": job, "model": meta_model, "num_classes": K, "weights_prefix": prefix}
    torch.save({"state_dict": state, "maskd": meta, "global_step": 1}, path)
    return path


def _perturb(model):
    """Random-init models have zero biases and unit BN stats; make every tensor count."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                noise = torch.randn(t.shape, generator=g) * 0.01
                t.add_(noise.abs() if "running_var" in name else noise)
    return model


def _same_detections(a, b, exact=True):
    """Equal predictions; ``exact=False`` allows float rounding (FrozenBatchNorm2d computes
    ``x * (w / sqrt(var + eps)) + b'`` where BatchNorm2d computes ``(x - mean) / ... ``)."""
    # Boxes are pixel coordinates (up to 64 here): float32 rounding of the two BatchNorm
    # forms moves them by up to ~1e-6 relative, i.e. a few 1e-5 pixels.
    tol = {"rtol": 0, "atol": 0} if exact else {"rtol": 1e-4, "atol": 1e-4}
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x["boxes"].shape[0] > 0  # compare real detections, not two empty lists
        for key in ("boxes", "scores", "labels"):
            torch.testing.assert_close(x[key], y[key], **tol)


@pytest.mark.parametrize("prefix", ["net.", "net.student."])
def test_detector_export_loads_into_torchvision_builder(tmp_path, prefix):
    # torchvision's mobilenet builder defaults rpn_score_thresh to 0.05; FasterRCNN to 0.0
    opts = {"min_size": 64, "max_size": 64, "box_score_thresh": 0.0, "rpn_score_thresh": 0.05}
    model, _ = build("fasterrcnn_mobilenet_v3_large_fpn", K, **opts)
    _perturb(model).eval()
    ckpt = _fake_checkpoint(
        tmp_path / "a.ckpt",
        model,
        {"name": "fasterrcnn_mobilenet_v3_large_fpn", "options": opts},
        prefix,
    )
    out, info = export_checkpoint(ckpt, tmp_path / "export.pt")
    assert "fasterrcnn_mobilenet_v3_large_fpn(" in info["torchvision"]
    assert json.loads((tmp_path / "export.pt.json").read_text())["num_classes"] == K
    tv = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn(
        weights=None, weights_backbone=None, num_classes=K + 1, **opts
    )
    tv.load_state_dict(torch.load(out, weights_only=True))  # strict
    tv.eval()
    images = [torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    with torch.no_grad():
        _same_detections(tv(images), model(images))
        # weights= alone would pick FrozenBatchNorm2d (outputs then agree to ~1e-7 only)
        again, _ = build(
            "fasterrcnn_mobilenet_v3_large_fpn", K, weights=str(out), frozen_bn=False, **opts
        )
        _same_detections(again.eval()(images), model(images))


def test_frozen_bn_resnet18_retinanet_loads_with_the_printed_torchvision_code(tmp_path):
    opts = {"min_size": 64, "max_size": 64, "score_thresh": 0.0, "frozen_bn": True}
    torch.manual_seed(0)
    model, _ = build("retinanet_resnet18_fpn", K, **opts)
    _perturb(model).eval()
    ckpt = _fake_checkpoint(
        tmp_path / "r.ckpt", model, {"name": "retinanet_resnet18_fpn", "options": opts}
    )
    out, info = export_checkpoint(ckpt, tmp_path / "r.pt")
    assert info["torchvision"] == torchvision_call("retinanet_resnet18_fpn", K, opts)
    # the architecture as the printed hint builds it, torchvision only (BatchNorm2d)
    backbone = resnet_fpn_backbone(
        backbone_name="resnet18",
        weights=None,
        norm_layer=torch.nn.BatchNorm2d,
        trainable_layers=5,
        returned_layers=[2, 3, 4],
        extra_blocks=LastLevelP6P7(256, 256),
    )
    tv = torchvision.models.detection.RetinaNet(
        backbone, num_classes=K + 1, min_size=64, max_size=64, score_thresh=0.0
    )
    tv.load_state_dict(torch.load(out, weights_only=True))
    tv.eval()
    images = [torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(5))]
    with torch.no_grad():
        _same_detections(tv(images), model(images), exact=False)


def test_segmenter_export_loads_into_torchvision_deeplabv3(tmp_path):
    model, _ = build("deeplabv3_resnet50", K)
    _perturb(model).eval()
    ckpt = _fake_checkpoint(
        tmp_path / "s.ckpt", model, {"name": "deeplabv3_resnet50", "options": {}}
    )
    out, _ = export_checkpoint(ckpt, tmp_path / "s.pt")
    state = torch.load(out, weights_only=True)
    assert not any(k.startswith("model.") for k in state)
    tv = torchvision.models.segmentation.deeplabv3_resnet50(
        weights=None, weights_backbone=None, num_classes=K, aux_loss=True
    )
    tv.load_state_dict(state)
    tv.eval()
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(tv(x)["out"], model(x), rtol=0, atol=0)


def test_export_rejects_foreign_checkpoints(tmp_path):
    torch.save({"state_dict": {"w": torch.zeros(1)}}, tmp_path / "x.ckpt")
    with pytest.raises(ValueError, match="not a checkpoint of 'maskd train'"):
        export_checkpoint(tmp_path / "x.ckpt", tmp_path / "y.pt")
    assert not (tmp_path / "y.pt").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"", r"is empty \(0 bytes\)"), (b"garbage\n", "or not a checkpoint")],
)
def test_export_names_an_unreadable_checkpoint_in_one_line(tmp_path, content, message):
    (tmp_path / "bad.ckpt").write_bytes(content)
    with pytest.raises(ValueError, match=message) as info:
        export_checkpoint(tmp_path / "bad.ckpt", tmp_path / "y.pt")
    text = str(info.value)
    assert "\n" not in text and not text.endswith(":") and "bad.ckpt" in text
    assert not (tmp_path / "y.pt").exists()


def _run(code):
    """Evaluate a printed call with nothing imported but torch, torchvision and maskd."""
    import maskd.models

    return eval(code, {"torch": torch, "torchvision": torchvision, "maskd": maskd})


def _export(tmp_path, name, opts, seed=0):
    torch.manual_seed(seed)
    model, _ = build(name, K, **opts)
    _perturb(model).eval()
    ckpt = _fake_checkpoint(tmp_path / f"{name}.ckpt", model, {"name": name, "options": opts})
    out, info = export_checkpoint(ckpt, tmp_path / f"{name}.pt")
    return model, out, info


IMAGES = [torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(7))]


def test_p6_from_c5_and_multiscale_sizes_load_with_the_printed_torchvision_code(tmp_path):
    """extra_levels_from: c5 is torchvision's LastLevelP6P7(C5 channels, 256); a min_size
    list is the tuple torchvision's transform draws from."""
    opts = {
        "min_size": [48, 64],
        "max_size": 64,
        "score_thresh": 0.0,
        "frozen_bn": False,
        "extra_levels_from": "c5",
        "relu_before_p7": True,
    }
    model, out, info = _export(tmp_path, "retinanet_resnet18_fpn", opts)
    code = info["torchvision"]
    assert info["torchvision_gap"] is None
    assert "LastLevelP6P7(512, 256)" in code and "min_size=(48, 64)" in code
    assert "extra_levels_from" not in code and "relu_before_p7" not in code
    tv = _run(code)
    tv.load_state_dict(torch.load(out, weights_only=True))  # strict
    assert tuple(tv.transform.min_size) == (48, 64)
    with torch.no_grad():
        _same_detections(tv.eval()(IMAGES), model(IMAGES))
    # the named torchvision builders cannot take it: the class form with C5's channels
    call = torchvision_call("retinanet_resnet50_fpn", 80, {"extra_levels_from": "c5"})
    assert "retinanet_resnet50_fpn(" not in call and "LastLevelP6P7(2048, 256)" in call
    assert "LastLevelP6P7" not in torchvision_call("retinanet_resnet50_fpn", 80, {})


def test_mmdet_p7_without_relu_has_no_torchvision_call_and_loads_with_maskd(tmp_path, capsys):
    opts = {
        "min_size": 64,
        "max_size": 64,
        "score_thresh": 0.0,
        "extra_levels_from": "c5",
        "relu_before_p7": False,
    }
    model, _, info = _export(tmp_path, "retinanet_resnet18_fpn", opts)
    assert info["torchvision"] is None and "relu_before_p7: false" in info["torchvision_gap"]
    assert (
        json.loads((tmp_path / "retinanet_resnet18_fpn.pt.json").read_text())["maskd"]
        == (info["maskd"])
    )
    again = _run(info["maskd"])  # the builder options and the exported file
    with torch.no_grad():
        _same_detections(again.eval()(IMAGES), model(IMAGES), exact=False)
    # the command line says so instead of printing a torchvision call that would not build
    from maskd.cli import main

    ckpt = tmp_path / "retinanet_resnet18_fpn.ckpt"
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "c.pt")]) == 0
    printed = capsys.readouterr().out
    assert "load without maskd" not in printed
    assert "no torchvision-only equivalent: P7 = conv(P6) without a ReLU" in printed
    assert "load with maskd: maskd.models.build('retinanet_resnet18_fpn', 3" in printed


def test_fcos_centerness_on_the_classification_tower_needs_maskd(tmp_path):
    opts = {"min_size": 64, "max_size": 64, "score_thresh": 0.0, "centerness_on": "cls"}
    assert torchvision_call("fcos_resnet50_fpn", 80, opts) is None
    _, _, info = _export(tmp_path, "fcos_resnet18_fpn", opts)
    assert info["torchvision"] is None and "centerness_on: cls" in info["torchvision_gap"]
    assert "centerness_on='cls'" in info["maskd"]
    # torchvision's layout (centerness_on: reg) is torchvision's own FCOS
    reg = {**opts, "centerness_on": "reg", "frozen_bn": False}
    model, out, info = _export(tmp_path, "fcos_resnet18_fpn", reg)
    assert "centerness_on" not in info["torchvision"]
    tv = _run(info["torchvision"])
    tv.load_state_dict(torch.load(out, weights_only=True))
    with torch.no_grad():
        _same_detections(tv.eval()(IMAGES), model(IMAGES))
    call = torchvision_call(
        "fcos_resnet50_fpn", 80, {"min_size": [640, 800], "max_size": 1333, "centerness_on": "reg"}
    )
    assert call == (
        "torchvision.models.detection.fcos_resnet50_fpn(weights=None, weights_backbone=None, "
        "num_classes=81, min_size=(640, 800), max_size=1333)"
    )
