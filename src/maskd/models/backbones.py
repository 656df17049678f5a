"""Classification backbones (ResNet, MobileNetV3-Large) built from torchvision's classes.

Each builder returns the plain torchvision network, with ImageNet weights from disk copied
in when a path is given, before any detection/segmentation wrapper renames its modules.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from torch import nn
from torchvision.models import mobilenet_v3_large, resnet18, resnet34, resnet50, resnet101
from torchvision.models.mobilenetv3 import MobileNetV3
from torchvision.models.resnet import ResNet

from maskd.errors import UserValueError
from maskd.models.resnet_dilated import resnet18_dilated
from maskd.models.weights import load_backbone_weights

RESNETS: dict[str, Callable[..., ResNet]] = {
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "resnet101": resnet101,
}
MOBILENETS = ("mobilenet_v3_large",)


def build_resnet(
    name: str,
    backbone_weights: str | Path | None = None,
    norm_layer: Callable[..., nn.Module] | None = None,
    replace_stride_with_dilation: Sequence[bool] | None = None,
) -> ResNet:
    """torchvision ResNet ``name``; ``replace_stride_with_dilation`` as in torchvision.

    ResNet-18 with any dilation uses :func:`resnet18_dilated` (same state-dict keys).
    ImageNet weights at ``backbone_weights`` are loaded strictly, ignoring ``fc.*``.
    """
    if name not in RESNETS:
        raise UserValueError(f"unknown ResNet {name!r}; expected one of {sorted(RESNETS)}")
    dilated = replace_stride_with_dilation is not None and any(replace_stride_with_dilation)
    if dilated and name == "resnet18":
        net: ResNet = resnet18_dilated(replace_stride_with_dilation, norm_layer=norm_layer)
    elif dilated and name == "resnet34":
        raise UserValueError(
            "a dilated ResNet-34 is not provided; use resnet18, resnet50 or resnet101"
        )
    else:
        net = RESNETS[name](
            weights=None,
            norm_layer=norm_layer,
            replace_stride_with_dilation=(
                list(replace_stride_with_dilation) if replace_stride_with_dilation else None
            ),
        )
    if backbone_weights is not None:
        load_backbone_weights(net, backbone_weights, ignore_prefixes=("fc.",))
    return net


def build_mobilenet(
    name: str,
    backbone_weights: str | Path | None = None,
    norm_layer: Callable[..., nn.Module] | None = None,
    dilated: bool = False,
) -> MobileNetV3:
    """torchvision MobileNetV3-Large; ``dilated=True`` gives output stride 16 (segmentation).

    ImageNet weights at ``backbone_weights`` are loaded strictly, ignoring ``classifier.*``.
    """
    if name not in MOBILENETS:
        raise UserValueError(f"unknown MobileNet {name!r}; expected one of {list(MOBILENETS)}")
    net = mobilenet_v3_large(weights=None, norm_layer=norm_layer, dilated=dilated)
    if backbone_weights is not None:
        load_backbone_weights(net, backbone_weights, ignore_prefixes=("classifier.",))
    return net


def mobilenet_stage_indices(features: nn.Sequential) -> list[int]:
    """Indices of the blocks that start a stage (torchvision's ``_is_cn`` marks), plus first/last."""
    strided = [i for i, b in enumerate(features) if getattr(b, "_is_cn", False)]
    return [0, *strided, len(features) - 1]
