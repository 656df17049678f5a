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
