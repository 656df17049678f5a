"""SmoothL1 on Faster R-CNN's RoI box regression: the MasKD authors' extra Faster R-CNN term.

The student's RoI box regression ``s = [R, (K+1)·4]`` (``roi_heads.box_predictor``) against
the frozen teacher's RoI head run on the *student's* sampled training proposals: the teacher's
``roi_heads.box_roi_pool(teacher FPN features, student proposals, image sizes)`` →
``box_head`` → ``box_predictor`` gives ``t``, under ``torch.no_grad()`` (its RPN never runs).

    loss = weight · mean SmoothL1_{β=1}(s[:, 4:], t[:, 4:])

over the ``R · K · 4`` foreground-class deltas: the authors' mmrazor config
(``configs/distill/maskd/fpn_r101-fpn_r50_coco.py``) uses mmdet's
``SmoothL1Loss`` with its defaults (``beta=1.0``, mean reduction) on ``fc_reg``, whose ``K·4``
outputs have no background class. Torchvision's predictor has one more, never-trained block of
four for the background class 0, which is left out here. Works for Faster R-CNN's subclasses
too (e.g. Mask R-CNN's box branch).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN

from maskd.errors import UserRuntimeError, UserValueError
from maskd.recorder import Record
from maskd.terms.base import TermInputs
from maskd.terms.head import HeadTerm, feature_dict

__all__ = ["RCNNSmoothL1Term"]


class RCNNSmoothL1Term(HeadTerm):
    """SmoothL1 on Faster R-CNN's RoI box regression, the teacher fed the student's proposals.

    Records the student's sampled proposals (``list[[R_i, 4]]``, xyxy in the resized image)
    and image sizes as they enter ``roi_heads.box_roi_pool``, and its
    ``roi_heads.box_predictor`` output ``(class_logits [R, K+1], box_regression [R, (K+1)·4])``.
    Returns ``{"loss_<name>": weight · mean SmoothL1}`` (no per-level values: one RoI head).

    Args:
        weight: scale of the term (authors: 1).
        name: default ``rcnn_smoothl1``.
    """

    kind = "rcnn_smoothl1"
    detector = FasterRCNN
    beta = 1.0

    def student_records(self) -> dict[str, Record]:
        return {
            f"{self.kind}/roi_pool_args": Record("roi_heads.box_roi_pool", "pre"),
            f"{self.kind}/box_predictor": Record("roi_heads.box_predictor"),
        }

    def check_models(self, student: nn.Module, teacher: nn.Module) -> None:
        shapes = []
        for model in (student, teacher):
            pred = model.roi_heads.box_predictor
            shapes.append(
                tuple(
                    getattr(getattr(pred, n, None), "out_features", None)
                    for n in ("cls_score", "bbox_pred")
                )
            )
        if shapes[0] != shapes[1]:
            raise UserValueError(
                f"{self.kind} term needs the same box predictor outputs (classes, box deltas), "
                f"but the student's are {shapes[0]} and the teacher's {shapes[1]}"
            )

    @staticmethod
    def teacher_box_regression(
        teacher: nn.Module, features: Mapping[str, Tensor], proposals: list[Tensor], sizes: list
    ) -> Tensor:
        """The teacher's RoI box regression ``[R, (K+1)·4]`` for the given proposals."""
        heads = teacher.roi_heads
        with torch.no_grad():
            x = heads.box_roi_pool(features, proposals, sizes)
            x = heads.box_head(x)
            _, regression = heads.box_predictor(x)
        return regression

    def forward(self, inputs: TermInputs) -> dict[str, Tensor]:
        args = inputs.student[f"{self.kind}/roi_pool_args"]
        if len(args) < 3:
            raise UserRuntimeError(
                f"{self.kind} term: roi_heads.box_roi_pool must be called as "
                "(features, proposals, image_sizes)"
            )
        proposals = [p.detach() for p in args[1]]
        sizes = [tuple(int(v) for v in s) for s in args[2]]
        logits, s = inputs.student[f"{self.kind}/box_predictor"]
        features = feature_dict(inputs.teacher[self.features])
        t = self.teacher_box_regression(inputs.teacher.model, features, proposals, sizes)
        if s.shape != t.shape:
            raise UserValueError(
                f"{self.kind} term: the student's RoI box regression {tuple(s.shape)} and the "
                f"teacher's {tuple(t.shape)} differ in shape"
            )
        if s.shape[1] == 4 * logits.shape[1] and s.shape[1] > 4:
            s, t = s[:, 4:], t[:, 4:]  # class 0 (background) deltas are never trained
        if s.numel() == 0:
            return {f"loss_{self.name}": s.sum() * 0.0}
        return {
            f"loss_{self.name}": F.smooth_l1_loss(s.float(), t.float(), beta=self.beta)
            * self.weight
        }
