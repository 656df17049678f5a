"""Segmenters: DeepLabV3 / FCN on dilated ResNets, DeepLabV3 / LRASPP on MobileNetV3-Large.

Built from torchvision's classes with torchvision's module names, then wrapped in
:class:`maskd.tasks.SegmentationTask` (layer paths gain the ``model.`` prefix).

- ResNet-18/50/101: output stride 8 (``replace_stride_with_dilation=[False, True, True]``,
  as torchvision's and the authors' segmenters); ResNet-18 uses
  :func:`maskd.models.resnet_dilated.resnet18_dilated`. Auxiliary ``FCNHead`` on ``layer3``.
- MobileNetV3-Large: dilated last stage (output stride 16), as torchvision. DeepLabV3 has an
  auxiliary ``FCNHead`` on the stride-8 stage; LRASPP has none.

Default distillation layer: the logits (``model.classifier.4``, the head's last conv; for
LRASPP the whole head ``model.classifier``, whose output is the sum of its two classifier
convs). ``layers="backbone"`` picks the backbone's last stage instead.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.segmentation.deeplabv3 import DeepLabHead, DeepLabV3
from torchvision.models.segmentation.fcn import FCN, FCNHead
from torchvision.models.segmentation.lraspp import LRASPP

from maskd.errors import UserTypeError, UserValueError
from maskd.models.backbones import (
    MOBILENETS,
    build_mobilenet,
    build_resnet,
    mobilenet_stage_indices,
)
from maskd.tasks import SegmentationTask

SEGMENTATION_ARCHS: dict[str, tuple[str, ...]] = {
    "deeplabv3": ("resnet18", "resnet50", "resnet101", *MOBILENETS),
    "fcn": ("resnet18", "resnet50", "resnet101"),
    "lraspp": MOBILENETS,
}
LAYER_CHOICES = ("logits", "backbone")
_OUTPUT_STRIDE_8 = (False, True, True)


def segmentation_layers(arch: str, backbone: str) -> dict[str, list[str]]:
    """Layer paths (relative to the returned ``SegmentationTask``) for each ``layers`` choice."""
    logits = "model.classifier" if arch == "lraspp" else "model.classifier.4"
    # mobilenet_v3_large().features[16] is its final 1×1 conv
    last = "model.backbone.16" if backbone in MOBILENETS else "model.backbone.layer4"
    return {"logits": [logits], "backbone": [last]}


def build_segmenter(
    arch: str,
    backbone: str,
    num_classes: int,
    backbone_weights: str | Path | None = None,
    pretrained: bool = False,
    *,
    aux_loss: bool | None = None,
    ignore_index: int = 255,
    aux_weight: float = 0.4,
    layers: str = "logits",
) -> tuple[SegmentationTask, list[str]]:
    """Build ``arch`` on ``backbone`` predicting ``num_classes`` classes, as a SegmentationTask.

    ``aux_loss`` defaults to True where the architecture has an auxiliary head (not LRASPP);
    its loss is weighted by ``aux_weight`` in the task wrapper. ``pretrained`` is accepted for
    a uniform builder signature and has no effect (segmenters always use plain BatchNorm).
    Eval forward: images ``[N, 3, H, W]`` → logits ``[N, num_classes, H, W]``.
    """
    del pretrained
    if arch not in SEGMENTATION_ARCHS:
        raise UserValueError(
            f"unknown segmenter {arch!r}; expected one of {sorted(SEGMENTATION_ARCHS)}"
        )
    if backbone not in SEGMENTATION_ARCHS[arch]:
        raise UserValueError(
            f"{arch} supports backbones {SEGMENTATION_ARCHS[arch]}, got {backbone!r}"
        )
    if layers not in LAYER_CHOICES:
        raise UserValueError(f"layers must be one of {LAYER_CHOICES}, got {layers!r}")
    if aux_loss is None:
        aux_loss = arch != "lraspp"
    if not isinstance(aux_loss, bool):
        raise UserTypeError(f"aux_loss must be a bool or None, got {aux_loss!r}")
    if aux_loss and arch == "lraspp":
        raise UserValueError("lraspp has no auxiliary head; pass aux_loss=False or leave it unset")

    if backbone in MOBILENETS:
        net = build_mobilenet(backbone, backbone_weights, dilated=True)
        model = _on_mobilenet(arch, net.features, num_classes, aux_loss)
    else:
        resnet = build_resnet(
            backbone, backbone_weights, replace_stride_with_dilation=_OUTPUT_STRIDE_8
        )
        model = _on_resnet(arch, resnet, num_classes, aux_loss)
    task = SegmentationTask(model, num_classes, ignore_index=ignore_index, aux_weight=aux_weight)
    return task, segmentation_layers(arch, backbone)[layers]


def _on_resnet(arch: str, resnet: nn.Module, num_classes: int, aux: bool) -> nn.Module:
    c5 = _out_channels(resnet.layer4)
    c4 = _out_channels(resnet.layer3)
    return_layers = {"layer4": "out"}
    if aux:
        return_layers["layer3"] = "aux"
    body = IntermediateLayerGetter(resnet, return_layers=return_layers)
    aux_head = FCNHead(c4, num_classes) if aux else None
    if arch == "deeplabv3":
        return DeepLabV3(body, DeepLabHead(c5, num_classes), aux_head)
    return FCN(body, FCNHead(c5, num_classes), aux_head)


def _on_mobilenet(arch: str, features: nn.Sequential, num_classes: int, aux: bool) -> nn.Module:
    stages = mobilenet_stage_indices(features)
    high, low = stages[-1], stages[-4]  # C5 (stride 16, dilated) and C2 (stride 8)
    if arch == "lraspp":
        body = IntermediateLayerGetter(features, return_layers={str(low): "low", str(high): "high"})
        return LRASPP(body, features[low].out_channels, features[high].out_channels, num_classes)
    return_layers = {str(high): "out"}
    if aux:
        return_layers[str(low)] = "aux"
    body = IntermediateLayerGetter(features, return_layers=return_layers)
    aux_head = FCNHead(features[low].out_channels, num_classes) if aux else None
    return DeepLabV3(body, DeepLabHead(features[high].out_channels, num_classes), aux_head)


def _out_channels(stage: nn.Sequential) -> int:
    """Channels a ResNet stage outputs: those of its last block's last BatchNorm."""
    last = stage[-1]
    bn = last.bn3 if hasattr(last, "bn3") else last.bn2
    return int(bn.num_features)
