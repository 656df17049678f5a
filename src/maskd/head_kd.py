"""Head-output distillation for torchvision detectors: the extra KD terms of stage 2.

Next to the masked feature loss, the MasKD authors distil the box-regression outputs of two
detectors (``docs/method.md``, "Stage 2"). Both terms follow the authors' public configs
(mmrazor, ``configs/distill/maskd/``), translated to torchvision's modules:

``retinanet_l1`` — RetinaNet
    The student's ``head.regression_head`` output ``[N, A_total, 4]`` (box deltas of every
    anchor of every FPN level, levels concatenated in order) against the frozen teacher's on
    the same images, hence the same anchors. The authors hook mmdet's ``retina_reg``, which
    runs once per FPN level, and apply one ``L1Loss`` (mmdet default: mean reduction) per
    level, so the loss is ``weight · Σ_l mean_l |s_l − t_l|``, the mean of level ``l`` taken
    over its ``N · H_l · W_l · A · 4`` elements (padding included, as there).

``rcnn_smoothl1`` — Faster R-CNN (and its subclasses, e.g. Mask R-CNN's box branch)
    The student's RoI box regression ``[R, (K+1)·4]`` (``roi_heads.box_predictor``) against
    the teacher's RoI head run on the *student's* sampled training proposals: the teacher's
    ``roi_heads.box_roi_pool(teacher FPN features, student proposals, image sizes)`` →
    ``box_head`` → ``box_predictor``. Loss ``weight · mean SmoothL1(s, t; beta=1)`` over the
    ``R · K · 4`` foreground-class deltas: the authors use mmdet's ``SmoothL1Loss`` with its
    defaults (``beta=1.0``, mean reduction) on ``fc_reg``, whose ``K·4`` outputs have no
    background class. Torchvision's predictor has one more, never-trained block of four for
    the background class 0, which is left out here.

A term says what it reads through :class:`~maskd.recorder.Record` objects: ``student_records`` for
the student's training forward, ``teacher_records`` for the teacher's (its ``backbone``
output, the FPN's ``OrderedDict`` as the heads receive it; the teacher stops there). Only the
teacher's head parts a term needs then run on those features, under ``torch.no_grad()``:
RetinaNet's regression branch (not its classification branch), Faster R-CNN's box RoI head
(not its RPN). FCOS and segmentation models have no such term.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN, RetinaNet

from maskd.errors import UserRuntimeError, UserTypeError, UserValueError
from maskd.recorder import Record, Recorder

__all__ = [
    "FEATURES_LAYER",
    "HEAD_KD_MODES",
    "HeadKD",
    "HeadKDMode",
    "RCNNSmoothL1HeadKD",
    "RetinaNetL1HeadKD",
    "build_head_kd",
    "resolve_head_kd",
]

HeadKDMode = Literal["auto", "retinanet_l1", "rcnn_smoothl1"]
HEAD_KD_MODES: tuple[str, ...] = ("auto", "retinanet_l1", "rcnn_smoothl1")

FEATURES_LAYER = "backbone"
"""The layer whose output (the FPN features) torchvision detectors feed to their heads."""

_SUPPORTED = "RetinaNet (retinanet_l1) and Faster R-CNN (rcnn_smoothl1)"


def resolve_head_kd(mode: str, student: nn.Module, teacher: nn.Module) -> str:
    """The concrete head-KD term for ``mode`` (``"auto"`` picks it from the student's type).

    Raises:
        ValueError: ``mode`` is unknown, or the models do not support it (FCOS, segmenters,
            a student and a teacher of different detector types).
    """
    if not isinstance(mode, str) or mode not in HEAD_KD_MODES:
        raise UserValueError(f"head_kd must be one of {list(HEAD_KD_MODES)} or None, got {mode!r}")
    kinds = {"retinanet_l1": RetinaNet, "rcnn_smoothl1": FasterRCNN}
    if mode == "auto":
        for name, cls in kinds.items():
            if isinstance(student, cls):
                mode = name
                break
        else:
            raise UserValueError(
                f"head_kd='auto' has no head-KD term for a {type(student).__name__} student: "
                f"head KD exists for {_SUPPORTED} only (the authors use none for FCOS or "
                "segmentation); pass head_kd=None"
            )
    cls = kinds[mode]
    for role, model in (("student", student), ("teacher", teacher)):
        if not isinstance(model, cls):
            raise UserValueError(
                f"head_kd={mode!r} needs a torchvision {cls.__name__} {role}, got "
                f"{type(model).__name__}; head KD exists for {_SUPPORTED} only"
            )
    return mode


def build_head_kd(mode: str, student: nn.Module, teacher: nn.Module, weight: float = 1.0) -> HeadKD:
    """The :class:`HeadKD` for ``mode`` (see :func:`resolve_head_kd`) with loss ``weight``."""
    resolved = resolve_head_kd(mode, student, teacher)
    cls = RetinaNetL1HeadKD if resolved == "retinanet_l1" else RCNNSmoothL1HeadKD
    return cls(student, teacher, weight)


def _feature_dict(features: Any) -> OrderedDict[str, Tensor]:
    """The ``backbone`` output as the heads take it (a lone tensor becomes ``{"0": tensor}``,
    as torchvision does)."""
    if isinstance(features, Tensor):
        return OrderedDict([("0", features)])
    if isinstance(features, Mapping) and all(isinstance(v, Tensor) for v in features.values()):
        return OrderedDict(features)
    raise UserTypeError(
        f"head KD needs the teacher's {FEATURES_LAYER!r} output as a tensor or a dict of "
        f"tensors, got {type(features).__name__}"
    )


class HeadKD(ABC):
    """One head-output distillation term between a student and a frozen teacher detector.

    Not an ``nn.Module``: it holds no parameters and only refers to the two models' modules
    (which the distiller owns). It names what it reads; the caller records it::

        student_rec = Recorder(student, head_kd.student_records)
        teacher_rec = Recorder(teacher, head_kd.teacher_records, stop=True)
        with torch.no_grad():
            teacher_rec.run(images)
        losses = student_rec.run(images, targets)   # a training-mode forward
        loss = head_kd.loss(student_rec, teacher_rec)

    Record names start with ``head_kd/``, so they can join other records in one recorder.

    Args:
        student: the detector being trained.
        teacher: the frozen detector (its head runs in its current mode, under no_grad).
        weight: scale of the term.
    """

    mode: str = ""
    FEATURES: ClassVar[str] = "head_kd/features"
    teacher_records: ClassVar[Mapping[str, Record]] = {FEATURES: Record(FEATURES_LAYER)}
    """What :meth:`loss` reads from the teacher's forward: its ``backbone`` output."""
    student_records: ClassVar[Mapping[str, Record]] = {}
    """What :meth:`loss` reads from the student's training forward."""

    def __init__(self, student: nn.Module, teacher: nn.Module, weight: float = 1.0) -> None:
        if isinstance(weight, bool) or not isinstance(weight, int | float):
            raise UserTypeError(f"head_kd_weight must be a number, got {type(weight).__name__}")
        if not math.isfinite(weight) or weight <= 0:
            raise UserValueError(
                f"head_kd_weight must be a positive finite number, got {weight!r} "
                "(pass head_kd=None to turn head KD off)"
            )
        self.student = student
        self.teacher = teacher
        self.weight = float(weight)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mode={self.mode!r}, weight={self.weight})"

    @abstractmethod
    def loss(self, student: Recorder, teacher: Recorder) -> Tensor:
        """The weighted scalar term from the last recorded forwards.

        Args:
            student: holds :attr:`student_records` of the student's training forward.
            teacher: holds :attr:`teacher_records` of the teacher's forward on the same images.
        """


class RetinaNetL1HeadKD(HeadKD):
    """L1 on RetinaNet's box-regression head outputs, summed over FPN levels of per-level means.

    Student ``head.regression_head`` output ``s`` and teacher output ``t``, both
    ``[N, A_total, 4]`` with ``A_total = Σ_l H_l · W_l · A``; split per level ``l`` into
    ``[N, H_l · W_l · A, 4]``: ``loss = weight · Σ_l mean |s_l − t_l|``.
    The teacher's regression branch runs on its own FPN features under ``torch.no_grad()``.
    """

    mode = "retinanet_l1"
    student_records: ClassVar[Mapping[str, Record]] = {
        "head_kd/regression_input": Record("head.regression_head", "input"),
        "head_kd/regression": Record("head.regression_head"),
    }

    def __init__(self, student: nn.Module, teacher: nn.Module, weight: float = 1.0) -> None:
        super().__init__(student, teacher, weight)
        s_reg, t_reg = student.head.regression_head, teacher.head.regression_head
        s_out, t_out = s_reg.bbox_reg.out_channels, t_reg.bbox_reg.out_channels
        if s_out != t_out:
            raise UserValueError(
                f"head_kd='retinanet_l1' needs the same anchors per location, but the student's "
                f"regression head predicts {s_out // 4} and the teacher's {t_out // 4}"
            )
        s_anchors, t_anchors = student.anchor_generator, teacher.anchor_generator
        s_cfg = (s_anchors.sizes, s_anchors.aspect_ratios)
        t_cfg = (t_anchors.sizes, t_anchors.aspect_ratios)
        if s_cfg != t_cfg:
            raise UserValueError(
                "head_kd='retinanet_l1' compares outputs anchor by anchor, but the anchor "
                f"generators differ: student sizes/aspect ratios {s_cfg}, teacher {t_cfg}"
            )

    def loss(self, student: Recorder, teacher: Recorder) -> Tensor:
        s = student["head_kd/regression"]
        s_sizes = [int(x.shape[-2] * x.shape[-1]) for x in student["head_kd/regression_input"]]
        feats = list(_feature_dict(teacher[self.FEATURES]).values())
        with torch.no_grad():
            t = self.teacher.head.regression_head(feats)
        t_sizes = [int(x.shape[-2] * x.shape[-1]) for x in feats]
        if s.shape != t.shape or s_sizes != t_sizes:
            raise UserValueError(
                "head_kd='retinanet_l1': the student's box regression "
                f"{tuple(s.shape)} (level sizes H·W {s_sizes}) and the teacher's "
                f"{tuple(t.shape)} (level sizes {t_sizes}) do not cover the same anchors"
            )
        per_anchor = s.shape[1] // sum(s_sizes)
        splits = [n * per_anchor for n in s_sizes]
        total = s.new_zeros((), dtype=torch.float32)
        for s_l, t_l in zip(s.split(splits, dim=1), t.split(splits, dim=1), strict=True):
            total = total + F.l1_loss(s_l.float(), t_l.float())
        return total * self.weight


class RCNNSmoothL1HeadKD(HeadKD):
    """SmoothL1 on Faster R-CNN's RoI box regression, the teacher fed the student's proposals.

    Captures the student's sampled proposals (``list[[R_i, 4]]``, xyxy in the resized image)
    and image sizes as they enter ``roi_heads.box_roi_pool``, and its
    ``roi_heads.box_predictor`` output ``(class_logits [R, K+1], box_regression [R, (K+1)·4])``.
    The teacher's ``box_roi_pool`` → ``box_head`` → ``box_predictor`` then runs on its own
    FPN features with those proposals under ``torch.no_grad()``:
    ``loss = weight · mean SmoothL1_{beta=1}(s[:, 4:], t[:, 4:])`` (background block dropped).
    """

    mode = "rcnn_smoothl1"
    beta = 1.0
    student_records: ClassVar[Mapping[str, Record]] = {
        "head_kd/roi_pool_args": Record("roi_heads.box_roi_pool", "pre"),
        "head_kd/box_predictor": Record("roi_heads.box_predictor"),
    }

    def __init__(self, student: nn.Module, teacher: nn.Module, weight: float = 1.0) -> None:
        super().__init__(student, teacher, weight)
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
                "head_kd='rcnn_smoothl1' needs the same box predictor outputs (classes, box "
                f"deltas), but the student's are {shapes[0]} and the teacher's {shapes[1]}"
            )

    def teacher_box_regression(
        self, features: Mapping[str, Tensor], proposals: list[Tensor], image_sizes: list
    ) -> Tensor:
        """The teacher's RoI box regression ``[R, (K+1)·4]`` for the given proposals."""
        heads = self.teacher.roi_heads
        with torch.no_grad():
            x = heads.box_roi_pool(features, proposals, image_sizes)
            x = heads.box_head(x)
            _, regression = heads.box_predictor(x)
        return regression

    def loss(self, student: Recorder, teacher: Recorder) -> Tensor:
        args = student["head_kd/roi_pool_args"]
        if len(args) < 3:
            raise UserRuntimeError(
                "head KD: roi_heads.box_roi_pool must be called as "
                "(features, proposals, image_sizes)"
            )
        proposals = [p.detach() for p in args[1]]
        sizes = [tuple(int(v) for v in s) for s in args[2]]
        logits, s = student["head_kd/box_predictor"]
        t = self.teacher_box_regression(_feature_dict(teacher[self.FEATURES]), proposals, sizes)
        if s.shape != t.shape:
            raise UserValueError(
                f"head_kd='rcnn_smoothl1': the student's RoI box regression {tuple(s.shape)} "
                f"and the teacher's {tuple(t.shape)} differ in shape"
            )
        if s.shape[1] == 4 * logits.shape[1] and s.shape[1] > 4:
            s, t = s[:, 4:], t[:, 4:]  # class 0 (background) deltas are never trained
        if s.numel() == 0:
            return s.sum() * 0.0
        return F.smooth_l1_loss(s.float(), t.float(), beta=self.beta) * self.weight
