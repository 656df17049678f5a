"""L1 on RetinaNet's box-regression outputs: the MasKD authors' extra RetinaNet term.

The authors' mmrazor config (``configs/distill/maskd/retinanet_r101-retinanet_r50_coco.py``)
hooks mmdet's ``retina_reg``, which runs once per FPN level, and applies one ``L1Loss``
(mmdet default: mean reduction) per level. With the student's ``head.regression_head``
output ``s`` and the frozen teacher's ``t`` on the same images (hence the same anchors), both
``[N, A_total, 4]`` with ``A_total = Σ_l H_l · W_l · A`` and split per level ``l`` into
``[N, H_l · W_l · A, 4]``:

    loss = weight · Σ_l mean |s_l − t_l|,

the mean of level ``l`` taken over its ``N · H_l · W_l · A · 4`` elements (padding included,
as there). The teacher's regression branch (not its classification branch) runs on its own
FPN features under ``torch.no_grad()``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import RetinaNet

from maskd.errors import UserValueError
from maskd.recorder import Record
from maskd.taps import flatten_output
from maskd.terms.base import TermInputs
from maskd.terms.head import FEATURES_LAYER, HeadTerm, feature_dict

__all__ = ["RetinaNetL1Term"]


class RetinaNetL1Term(HeadTerm):
    """L1 on RetinaNet's box-regression head outputs, summed over FPN levels of per-level means.

    Returns ``{"loss_<name>": weight · Σ_l mean |s_l − t_l|, "<name>/backbone:<key>": level
    mean}``, the levels named by the teacher's FPN keys.

    Args:
        weight: scale of the term (authors: 1).
        name: default ``retinanet_l1``.
    """

    kind = "retinanet_l1"
    detector = RetinaNet

    def student_records(self) -> dict[str, Record]:
        return {
            f"{self.kind}/regression_input": Record("head.regression_head", "input"),
            f"{self.kind}/regression": Record("head.regression_head"),
        }

    def check_models(self, student: nn.Module, teacher: nn.Module) -> None:
        s_reg, t_reg = student.head.regression_head, teacher.head.regression_head
        s_out, t_out = s_reg.bbox_reg.out_channels, t_reg.bbox_reg.out_channels
        if s_out != t_out:
            raise UserValueError(
                f"{self.kind} term needs the same anchors per location, but the student's "
                f"regression head predicts {s_out // 4} and the teacher's {t_out // 4}"
            )
        s_anchors, t_anchors = student.anchor_generator, teacher.anchor_generator
        s_cfg = (s_anchors.sizes, s_anchors.aspect_ratios)
        t_cfg = (t_anchors.sizes, t_anchors.aspect_ratios)
        if s_cfg != t_cfg:
            raise UserValueError(
                f"{self.kind} term compares outputs anchor by anchor, but the anchor "
                f"generators differ: student sizes/aspect ratios {s_cfg}, teacher {t_cfg}"
            )

    def forward(self, inputs: TermInputs) -> dict[str, Tensor]:
        s = inputs.student[f"{self.kind}/regression"]
        s_in = inputs.student[f"{self.kind}/regression_input"]
        s_sizes = [int(x.shape[-2] * x.shape[-1]) for x in s_in]
        feats = feature_dict(inputs.teacher[self.features])
        with torch.no_grad():
            t = inputs.teacher.model.head.regression_head(list(feats.values()))
        t_sizes = [int(x.shape[-2] * x.shape[-1]) for x in feats.values()]
        if s.shape != t.shape or s_sizes != t_sizes:
            raise UserValueError(
                f"{self.kind} term: the student's box regression {tuple(s.shape)} (level sizes "
                f"H·W {s_sizes}) and the teacher's {tuple(t.shape)} (level sizes {t_sizes}) do "
                "not cover the same anchors"
            )
        per_anchor = s.shape[1] // sum(s_sizes)
        splits = [n * per_anchor for n in s_sizes]
        names = [name for name, _ in flatten_output(FEATURES_LAYER, feats)]
        total = s.new_zeros((), dtype=torch.float32)
        levels: dict[str, Tensor] = {}
        for name, s_l, t_l in zip(names, s.split(splits, 1), t.split(splits, 1), strict=True):
            level = F.l1_loss(s_l.float(), t_l.float())
            levels[f"{self.name}/{name}"] = level.detach()
            total = total + level
        return {f"loss_{self.name}": total * self.weight, **levels}
