"""Detectors: Faster R-CNN, RetinaNet and FCOS on ResNet / MobileNetV3-Large FPN backbones.

Module names are those of torchvision's builders, so a state dict exported from here loads
into e.g. ``torchvision.models.detection.retinanet_resnet50_fpn(num_classes=K + 1)``.

- Faster R-CNN: FPN on C2–C5 plus a max-pooled level, P2–P6 (torchvision's default).
  MobileNetV3 follows ``fasterrcnn_mobilenet_v3_large_fpn``: two stride-32 maps + pool.
- RetinaNet / FCOS: FPN on C3–C5 plus ``LastLevelP6P7(256, 256)``, P3–P7, as torchvision's
  ``retinanet_resnet50_fpn`` / ``fcos_resnet50_fpn``. torchvision has no MobileNet variant;
  here C3/C4/C5 are the outputs of the last block at stride 8/16/32 (features 6, 12, 16).
  ``extra_levels_from="c5"`` / ``relu_before_p7=False`` give mmdet's RetinaNet P6/P7
  (:mod:`maskd.models.fpn_levels`).
- FCOS: ``centerness_on="cls"`` predicts centerness from the classification tower (mmdet's
  default, :mod:`maskd.models.fcos_head`) instead of torchvision's regression tower.

As in torchvision, a backbone that starts from weights (``backbone_weights`` or a whole-model
checkpoint) gets ``FrozenBatchNorm2d`` and 3 trainable stages; a random one gets
``BatchNorm2d`` and is trained whole. ``frozen_bn`` / ``trainable_backbone_layers`` override.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import (
    BackboneWithFPN,
    _mobilenet_extractor,
    _resnet_fpn_extractor,
)
from torchvision.ops.misc import FrozenBatchNorm2d

from maskd.errors import UserTypeError, UserValueError
from maskd.models.backbones import (
    MOBILENETS,
    RESNETS,
    build_mobilenet,
    build_resnet,
    mobilenet_stage_indices,
)
from maskd.models.fcos_head import ClsCenternessFCOSHead
from maskd.models.fcos_ranges import RangedFCOS, check_regress_ranges
from maskd.models.fpn_levels import ExtraSource, p6p7

DETECTORS: dict[str, type[nn.Module]] = {
    "fasterrcnn": FasterRCNN,
    "retinanet": RetinaNet,
    "fcos": FCOS,
}
DETECTION_BACKBONES = (*RESNETS, *MOBILENETS)
FPN_LAYER = "backbone.fpn"
BACKBONE_LAYER = "backbone.body"
# Keyword arguments torchvision's GeneralizedRCNNTransform takes through the detectors' **kwargs.
_TRANSFORM_KWARGS = {"size_divisible", "fixed_size", "_skip_resize"}
# Builder options of our own (beside the torchvision detector's).
_OWN_OPTIONS = {
    "trainable_backbone_layers",
    "frozen_bn",
    "box_regression_bias",
    "extra_levels_from",
    "relu_before_p7",
    "centerness_on",
    "regress_ranges",
    "anchor_sizes",
}
_FCOS_LEVELS = 5  # P3–P7
_ANCHOR_LEVELS = 5  # RetinaNet P3–P7; Faster R-CNN on a ResNet FPN: P2–P5 and the pool
# Last block at stride 8 / 16 / 32 in mobilenet_v3_large().features.
_MOBILENET_C3_C5 = (6, 12, 16)


def build_detector(
    arch: str,
    backbone: str,
    num_classes: int,
    backbone_weights: str | Path | None = None,
    pretrained: bool = False,
    *,
    min_size: int | tuple[int, ...] = 800,
    max_size: int = 1333,
    trainable_backbone_layers: int | None = None,
    frozen_bn: bool | None = None,
    box_regression_bias: float | None = None,
    extra_levels_from: ExtraSource = "p5",
    relu_before_p7: bool = True,
    centerness_on: str | None = None,
    regress_ranges: Sequence[Sequence[float | str]] | None = None,
    anchor_sizes: Sequence[float] | None = None,
    **kwargs: Any,
) -> tuple[nn.Module, list[str]]:
    """Build ``arch`` (fasterrcnn | retinanet | fcos) on ``backbone`` with FPN.

    ``num_classes`` counts foreground classes; the model predicts ``num_classes + 1``
    (index 0 = background, torchvision's convention). ``pretrained`` says a whole-model
    checkpoint will be loaded afterwards (only affects the BatchNorm/freezing defaults).
    ``min_size`` / ``max_size``: the shorter side is resized to ``min_size`` unless the longer
    would exceed ``max_size``. A list of sizes gives multi-scale training: torchvision draws
    one per training image from the global RNG (which every training step reseeds from the
    run's seed and position, so a resume draws the same), and evaluation uses the last one.
    ``box_regression_bias`` (FCOS only): start the box-regression conv's bias at this value
    instead of 0. FCOS clips its (left, top, right, bottom) distances with a ReLU, and a box
    with one side at 0 has zero area, so GIoU gives it no gradient; trained from scratch, a
    seed whose initial outputs are mostly negative never learns to regress boxes (loss stuck
    at 1). A positive start (e.g. 0.5: boxes the size of the anchor) keeps every side alive.
    ``extra_levels_from`` (RetinaNet / FCOS): P6 computed from ``"p5"`` (torchvision) or
    from the backbone's ``"c5"`` (mmdet's RetinaNet, ``add_extra_convs='on_input'``);
    ``relu_before_p7``: P7 = conv(ReLU(P6)) (torchvision, mmdet's FCOS) or conv(P6) (mmdet's
    RetinaNet).
    ``centerness_on`` (FCOS only): ``"reg"`` (torchvision, default) predicts centerness from
    the regression tower, ``"cls"`` from the classification tower (mmdet's default
    ``centerness_on_reg=False``, which the MasKD authors' FCOS teacher and student use).
    ``regress_ranges`` (FCOS only): one ``[low, high]`` per level P3–P7, the range of a
    positive location's largest box distance (mmdet's option; torchvision's are
    ``[0, 64], [64, 128], [128, 256], [256, 512], [512, inf]``, made for ~800 px images:
    smaller images put every object on P3). See :mod:`maskd.models.fcos_ranges`.
    ``anchor_sizes`` (RetinaNet, Faster R-CNN on a ResNet): one base anchor size in pixels
    per FPN level, smallest level first (torchvision's ``[32, 64, 128, 256, 512]`` suit
    ~800 px images; a 64 px image wants about a quarter). RetinaNet keeps torchvision's
    three scales per octave (``x``, ``x·2^(1/3)``, ``x·2^(2/3)``) and every detector its
    aspect ratios 0.5, 1, 2, so the heads' shapes do not change.
    Other ``kwargs`` go to the torchvision detector class (e.g. ``score_thresh``).
    Returns the detector and ``["backbone.fpn"]``, whose output dict holds every FPN level.
    """
    if arch not in DETECTORS:
        raise UserValueError(f"unknown detector {arch!r}; expected one of {sorted(DETECTORS)}")
    if backbone not in DETECTION_BACKBONES:
        raise UserValueError(
            f"unknown backbone {backbone!r}; expected one of {DETECTION_BACKBONES}"
        )
    cls = DETECTORS[arch]
    _check_kwargs(cls, kwargs)
    sizes = tuple(min_size) if isinstance(min_size, list | tuple) else (min_size,)
    for key, values in (("min_size", sizes), ("max_size", (max_size,))):
        if not values or any(
            isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values
        ):
            raise UserValueError(
                f"{key} must be a positive int (or, for min_size, a tuple of them), got {values!r}"
            )
    if max(sizes) > max_size:
        raise UserValueError(f"min_size ({min_size}) must not exceed max_size ({max_size})")
    if arch == "fasterrcnn" and (extra_levels_from != "p5" or relu_before_p7 is not True):
        raise UserValueError(
            "extra_levels_from / relu_before_p7 apply to RetinaNet and FCOS (P6/P7 convs); "
            "Faster R-CNN's extra level is a max-pool"
        )
    if len(sizes) > 1:
        min_size = sizes  # torchvision picks one at random per training image
    _check_centerness(arch, centerness_on, kwargs)
    if anchor_sizes is not None:
        kwargs[_anchor_kwarg(arch, backbone, kwargs)] = _anchor_generator(arch, anchor_sizes)

    is_trained = pretrained or backbone_weights is not None
    if frozen_bn is None:
        frozen_bn = is_trained
    norm_layer = FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d
    if backbone in RESNETS:
        trainable = _trainable(trainable_backbone_layers, is_trained, max_value=5)
        body = build_resnet(backbone, backbone_weights, norm_layer=norm_layer)
        if arch == "fasterrcnn":
            fpn_backbone = _resnet_fpn_extractor(body, trainable)
        else:
            extra = p6p7(body.fc.in_features, extra_levels_from, relu_before_p7)
            fpn_backbone = _resnet_fpn_extractor(
                body, trainable, returned_layers=[2, 3, 4], extra_blocks=extra
            )
    else:
        trainable = _trainable(trainable_backbone_layers, is_trained, max_value=6)
        net = build_mobilenet(backbone, backbone_weights, norm_layer=norm_layer)
        if arch == "fasterrcnn":
            fpn_backbone = _mobilenet_extractor(net, True, trainable)
            mobile_sizes = ((32, 64, 128, 256, 512),) * 3
            kwargs.setdefault(
                "rpn_anchor_generator",
                AnchorGenerator(mobile_sizes, ((0.5, 1.0, 2.0),) * len(mobile_sizes)),
            )
        else:
            c5 = net.features[_MOBILENET_C3_C5[-1]].out_channels
            extra = p6p7(c5, extra_levels_from, relu_before_p7)
            fpn_backbone = _mobilenet_p3_p7(net, trainable, extra)
    if centerness_on == "cls":
        kwargs["head"] = _cls_centerness_head(fpn_backbone, num_classes, kwargs)
    if regress_ranges is not None:
        if arch != "fcos":
            raise UserValueError(f"regress_ranges applies to FCOS only, not {arch!r}")
        cls = RangedFCOS
        kwargs["regress_ranges"] = check_regress_ranges(regress_ranges, _FCOS_LEVELS)
    model = cls(fpn_backbone, num_classes + 1, min_size=min_size, max_size=max_size, **kwargs)
    if box_regression_bias is not None:
        if arch != "fcos":
            raise UserValueError(f"box_regression_bias applies to FCOS only, not {arch!r}")
        if isinstance(box_regression_bias, bool) or not isinstance(
            box_regression_bias, int | float
        ):
            raise UserTypeError(
                f"box_regression_bias must be a number, got {box_regression_bias!r}"
            )
        nn.init.constant_(model.head.regression_head.bbox_reg.bias, float(box_regression_bias))
    return model, [FPN_LAYER]


def _anchor_kwarg(arch: str, backbone: str, kwargs: dict[str, Any]) -> str:
    """The detector's keyword for its anchor generator (``anchor_sizes`` checked to apply)."""
    if arch == "fcos":
        raise UserValueError(
            "anchor_sizes applies to RetinaNet and Faster R-CNN; FCOS is anchor-free (its "
            "levels' object sizes are set by regress_ranges)"
        )
    if arch == "fasterrcnn" and backbone not in RESNETS:
        raise UserValueError(
            f"anchor_sizes: Faster R-CNN on {backbone!r} has three levels of five sizes each; "
            "give rpn_anchor_generator= instead"
        )
    key = "rpn_anchor_generator" if arch == "fasterrcnn" else "anchor_generator"
    if key in kwargs:
        raise UserValueError(f"give either {key}= or anchor_sizes, not both")
    return key


def _anchor_generator(arch: str, sizes: object) -> AnchorGenerator:
    """torchvision's anchor layout for ``arch``, with ``sizes`` as each level's base size."""
    if (
        isinstance(sizes, str)
        or not isinstance(sizes, Sequence)
        or len(sizes) != _ANCHOR_LEVELS
        or any(
            isinstance(v, bool) or not isinstance(v, int | float) or not 0 < v < math.inf
            for v in sizes
        )
    ):
        raise UserValueError(
            f"anchor_sizes must be {_ANCHOR_LEVELS} positive numbers, one per FPN level "
            f"(torchvision's: [32, 64, 128, 256, 512]), got {sizes!r}"
        )
    if arch == "retinanet":  # three scales per octave, as torchvision's _default_anchorgen
        per_level = tuple((x, int(x * 2 ** (1 / 3)), int(x * 2 ** (2 / 3))) for x in sizes)
    else:
        per_level = tuple((x,) for x in sizes)
    return AnchorGenerator(per_level, ((0.5, 1.0, 2.0),) * len(per_level))


def _check_centerness(arch: str, centerness_on: object, kwargs: dict[str, Any]) -> None:
    if centerness_on is None:
        return
    if arch != "fcos":
        raise UserValueError(f"centerness_on applies to FCOS only, not {arch!r}")
    if centerness_on not in ("reg", "cls"):
        raise UserValueError(f"centerness_on must be 'reg' or 'cls', got {centerness_on!r}")
    if centerness_on == "cls" and "head" in kwargs:
        raise UserValueError("give either head= or centerness_on='cls', not both")


def _cls_centerness_head(
    backbone: nn.Module, num_classes: int, kwargs: dict[str, Any]
) -> ClsCenternessFCOSHead:
    """An FCOS head for ``backbone`` with centerness on the classification tower."""
    generator = kwargs.get("anchor_generator")
    anchors = generator.num_anchors_per_location()[0] if generator is not None else 1
    return ClsCenternessFCOSHead(backbone.out_channels, anchors, num_classes + 1)


def _mobilenet_p3_p7(
    net: nn.Module, trainable_layers: int, extra_blocks: nn.Module
) -> BackboneWithFPN:
    """MobileNetV3 features → FPN on C3–C5 + P6/P7 (5 levels, strides 8…128)."""
    features = net.features
    stages = mobilenet_stage_indices(features)
    freeze_before = (
        len(features) if trainable_layers == 0 else stages[len(stages) - trainable_layers]
    )
    for block in features[:freeze_before]:
        block.requires_grad_(False)
    return BackboneWithFPN(
        features,
        return_layers={str(i): str(level) for level, i in enumerate(_MOBILENET_C3_C5)},
        in_channels_list=[features[i].out_channels for i in _MOBILENET_C3_C5],
        out_channels=256,
        extra_blocks=extra_blocks,
    )


def _trainable(value: int | None, is_trained: bool, max_value: int) -> int:
    if value is None:
        return 3 if is_trained else max_value
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= max_value:
        raise UserValueError(
            f"trainable_backbone_layers must be an int in [0, {max_value}], got {value!r}"
        )
    return value


def _check_kwargs(cls: type[nn.Module], kwargs: dict[str, Any]) -> None:
    params = inspect.signature(cls.__init__).parameters
    allowed = {
        n for n, p in params.items() if p.kind is p.POSITIONAL_OR_KEYWORD
    } | _TRANSFORM_KWARGS
    allowed -= {"self", "backbone", "num_classes"}
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise UserTypeError(
            f"unexpected keyword argument(s) {unknown} for {cls.__name__}; "
            f"accepted: {sorted(allowed | _OWN_OPTIONS)}"
        )
