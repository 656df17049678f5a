"""RetinaNet / FCOS extra FPN levels: torchvision's P6 = conv(P5), P7 = conv(ReLU(P6)), or
mmdet's RetinaNet P6 = conv(C5), P7 = conv(P6) (``extra_levels_from``, ``relu_before_p7``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

import maskd.models as M

SMALL = {"min_size": 64, "max_size": 64}


def _levels(model, image_size: int = 64):
    """Run the FPN backbone; return (backbone maps C3–C5, FPN outputs, P6 input, P7 input)."""
    seen: dict[str, torch.Tensor] = {}
    body = model.backbone.body
    extra = model.backbone.fpn.extra_blocks
    hooks = [
        body.register_forward_hook(lambda m, i, o: seen.__setitem__("c", list(o.values()))),
        extra.p6.register_forward_pre_hook(lambda m, i: seen.__setitem__("p6_in", i[0])),
        extra.p7.register_forward_pre_hook(lambda m, i: seen.__setitem__("p7_in", i[0])),
    ]
    model.eval()
    with torch.no_grad():
        out = model.backbone(torch.rand(1, 3, image_size, image_size))
    for h in hooks:
        h.remove()
    return seen["c"], out, seen["p6_in"], seen["p7_in"]


@pytest.mark.parametrize(
    ("name", "c5_channels"), [("retinanet_resnet18_fpn", 512), ("fcos_mobilenet_v3_large_fpn", 960)]
)
def test_p6_from_c5_and_p7_without_relu(name, c5_channels):
    torch.manual_seed(0)
    model, _ = M.build(name, 3, extra_levels_from="c5", relu_before_p7=False, **SMALL)
    extra = model.backbone.fpn.extra_blocks
    assert extra.p6.weight.shape == (256, c5_channels, 3, 3)
    c, out, p6_in, p7_in = _levels(model)
    assert list(out) == ["0", "1", "2", "p6", "p7"]
    torch.testing.assert_close(p6_in, c[-1], rtol=0, atol=0)  # C5, not P5
    torch.testing.assert_close(p7_in, out["p6"], rtol=0, atol=0)  # P6 itself, no ReLU
    assert bool((out["p6"] < 0).any())  # so a ReLU would have changed P7's input
    want_p7 = F.conv2d(out["p6"], extra.p7.weight, extra.p7.bias, stride=2, padding=1)
    torch.testing.assert_close(out["p7"], want_p7)


def test_default_is_torchvision_p5_with_relu():
    torch.manual_seed(0)
    model, _ = M.build("retinanet_resnet18_fpn", 3, **SMALL)
    extra = model.backbone.fpn.extra_blocks
    assert type(extra) is LastLevelP6P7 and extra.p6.weight.shape == (256, 256, 3, 3)
    _, out, p6_in, p7_in = _levels(model)
    torch.testing.assert_close(p6_in, out["2"], rtol=0, atol=0)  # P5
    torch.testing.assert_close(p7_in, F.relu(out["p6"]), rtol=0, atol=0)


def test_c5_with_relu_and_p5_without():
    torch.manual_seed(0)
    model, _ = M.build("retinanet_resnet18_fpn", 3, extra_levels_from="c5", **SMALL)
    c, out, p6_in, p7_in = _levels(model)
    torch.testing.assert_close(p6_in, c[-1], rtol=0, atol=0)
    torch.testing.assert_close(p7_in, F.relu(out["p6"]), rtol=0, atol=0)
    model, _ = M.build("fcos_resnet18_fpn", 3, relu_before_p7=False, **SMALL)
    _, out, p6_in, p7_in = _levels(model)
    torch.testing.assert_close(p6_in, out["2"], rtol=0, atol=0)
    torch.testing.assert_close(p7_in, out["p6"], rtol=0, atol=0)


def test_state_dict_names_unchanged():
    torch.manual_seed(0)
    default, _ = M.build("retinanet_resnet18_fpn", 3, **SMALL)
    mmdet_way, _ = M.build(
        "retinanet_resnet18_fpn", 3, extra_levels_from="c5", relu_before_p7=False, **SMALL
    )
    assert list(default.state_dict()) == list(mmdet_way.state_dict())


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("retinanet_resnet18_fpn", {"extra_levels_from": "c4"}, "extra_levels_from must be"),
        ("retinanet_resnet18_fpn", {"relu_before_p7": "no"}, "relu_before_p7 must be"),
        ("fasterrcnn_resnet18_fpn", {"extra_levels_from": "c5"}, "RetinaNet and FCOS"),
        ("fasterrcnn_resnet18_fpn", {"relu_before_p7": False}, "RetinaNet and FCOS"),
    ],
)
def test_bad_extra_level_options(name, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        M.build(name, 3, **SMALL, **kwargs)
