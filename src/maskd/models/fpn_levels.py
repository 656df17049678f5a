"""The FPN's extra levels P6 and P7 of RetinaNet and FCOS: torchvision's or mmdet's way.

torchvision's ``retinanet_resnet50_fpn`` / ``fcos_resnet50_fpn`` use ``LastLevelP6P7(256, 256)``:
P6 = conv(P5), P7 = conv(ReLU(P6)) (torchvision's ``use_P5`` flag is set when the block's
input and output channels are equal). mmdet's RetinaNet (``configs/_base_/models/
retinanet_r50_fpn.py``: ``add_extra_convs='on_input'``, ``relu_before_extra_convs`` left at
False in ``mmdet/models/necks/fpn.py``), which the MasKD authors distil, computes
P6 = conv(C5) and P7 = conv(P6) with no ReLU. mmdet's FCOS (``add_extra_convs='on_output'``,
``relu_before_extra_convs=True``) is torchvision's way.

Module and tensor names stay torchvision's (``extra_blocks.p6`` / ``extra_blocks.p7``), so a
state dict moves between the two; only P6's input channels differ (C5's instead of 256).
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from maskd.errors import UserTypeError, UserValueError

__all__ = ["P6P7", "ExtraSource", "p6p7"]

ExtraSource = Literal["p5", "c5"]


class P6P7(LastLevelP6P7):
    """``LastLevelP6P7`` with its input (P5 or C5) and the ReLU before P7 chosen explicitly.

    torchvision infers the input from ``in_channels == out_channels``, which picks P5 for a
    backbone whose C5 happens to have 256 channels; here ``source`` decides.
    """

    def __init__(
        self, in_channels: int, out_channels: int, source: ExtraSource, relu_before_p7: bool
    ) -> None:
        super().__init__(in_channels, out_channels)
        self.use_P5 = source == "p5"
        self.relu_before_p7 = relu_before_p7

    def forward(
        self, p: list[Tensor], c: list[Tensor], names: list[str]
    ) -> tuple[list[Tensor], list[str]]:
        """``p``: FPN outputs P3–P5 ``[N, 256, H, W]``; ``c``: backbone maps C3–C5."""
        p6 = self.p6(p[-1] if self.use_P5 else c[-1])
        p7 = self.p7(F.relu(p6) if self.relu_before_p7 else p6)
        p.extend([p6, p7])
        names.extend(["p6", "p7"])
        return p, names


def p6p7(
    c5_channels: int, source: ExtraSource = "p5", relu_before_p7: bool = True
) -> LastLevelP6P7:
    """P6/P7 block of 256 channels; torchvision's own class for its default (P5, ReLU)."""
    if source not in ("p5", "c5"):
        raise UserValueError(f"extra_levels_from must be 'p5' or 'c5', got {source!r}")
    if not isinstance(relu_before_p7, bool):
        raise UserTypeError(f"relu_before_p7 must be true or false, got {relu_before_p7!r}")
    if source == "p5" and relu_before_p7:
        return LastLevelP6P7(256, 256)
    return P6P7(c5_channels if source == "c5" else 256, 256, source, relu_before_p7)
