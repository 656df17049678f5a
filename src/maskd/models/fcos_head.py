"""FCOS head with the centerness branch on the classification tower.

torchvision's ``FCOSHead`` predicts centerness from the regression tower (mmdet's
``centerness_on_reg=True``, a later improvement by the FCOS authors). mmdet's ``FCOSHead``
defaults to ``centerness_on_reg=False``: centerness comes from the classification tower,
and that is what the MasKD authors' FCOS teacher (mmdet's
``fcos_r101_caffe_fpn_gn-head_mstrain_640-800_2x_coco``, default head) and student
(``centerness_on_reg=False`` in ``mmrazor/configs/distill/maskd/fcos_r101-fcos_r50_coco.py``)
use.

:class:`ClsCenternessFCOSHead` is a drop-in ``FCOSHead``: the same losses (its
``compute_loss`` is torchvision's) and the same output dict. Its centerness conv sits at
``head.classification_head.bbox_ctrness`` (torchvision: ``head.regression_head.bbox_ctrness``),
so a checkpoint of one layout does not load silently into a model of the other.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.models.detection.fcos import (
    FCOSClassificationHead,
    FCOSHead,
    FCOSRegressionHead,
)

__all__ = ["BoxRegressionHead", "ClassificationCenternessHead", "ClsCenternessFCOSHead"]


def _flatten(x: Tensor, channels: int) -> Tensor:
    """``[N, A * channels, H, W]`` → ``[N, H * W * A, channels]`` (torchvision's order)."""
    n, _, h, w = x.shape
    return x.view(n, -1, channels, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, channels)


class ClassificationCenternessHead(FCOSClassificationHead):
    """Classification tower → class logits and centerness logits.

    ``forward(features)`` takes the FPN levels ``[N, C, H_l, W_l]`` and returns
    ``(cls_logits [N, Σ H_l W_l A, K], bbox_ctrness [N, Σ H_l W_l A, 1])``.
    """

    def __init__(
        self, in_channels: int, num_anchors: int, num_classes: int, num_convs: int = 4
    ) -> None:
        super().__init__(in_channels, num_anchors, num_classes, num_convs)
        self.bbox_ctrness = nn.Conv2d(in_channels, num_anchors, kernel_size=3, padding=1)
        nn.init.normal_(self.bbox_ctrness.weight, std=0.01)
        nn.init.zeros_(self.bbox_ctrness.bias)

    def forward(self, x: list[Tensor]) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        logits, ctrness = [], []
        for features in x:
            tower = self.conv(features)
            logits.append(_flatten(self.cls_logits(tower), self.num_classes))
            ctrness.append(_flatten(self.bbox_ctrness(tower), 1))
        return torch.cat(logits, dim=1), torch.cat(ctrness, dim=1)


class BoxRegressionHead(FCOSRegressionHead):
    """Regression tower → box distances ``[N, Σ H_l W_l A, 4]`` (ReLU-clipped), no centerness."""

    def __init__(self, in_channels: int, num_anchors: int, num_convs: int = 4) -> None:
        super().__init__(in_channels, num_anchors, num_convs)
        del self.bbox_ctrness

    def forward(self, x: list[Tensor]) -> Tensor:  # type: ignore[override]
        boxes = [
            _flatten(nn.functional.relu(self.bbox_reg(self.conv(features))), 4) for features in x
        ]
        return torch.cat(boxes, dim=1)


class ClsCenternessFCOSHead(FCOSHead):
    """torchvision's ``FCOSHead`` with centerness predicted from the classification tower.

    ``forward(features)`` returns ``{"cls_logits" [N, HWA, K], "bbox_regression" [N, HWA, 4],
    "bbox_ctrness" [N, HWA, 1]}``, as torchvision's head does.
    """

    def __init__(
        self, in_channels: int, num_anchors: int, num_classes: int, num_convs: int = 4
    ) -> None:
        super().__init__(in_channels, num_anchors, num_classes, num_convs)
        self.classification_head = ClassificationCenternessHead(
            in_channels, num_anchors, num_classes, num_convs
        )
        self.regression_head = BoxRegressionHead(in_channels, num_anchors, num_convs)

    def forward(self, x: list[Tensor]) -> dict[str, Tensor]:
        cls_logits, bbox_ctrness = self.classification_head(x)
        return {
            "cls_logits": cls_logits,
            "bbox_regression": self.regression_head(x),
            "bbox_ctrness": bbox_ctrness,
        }
