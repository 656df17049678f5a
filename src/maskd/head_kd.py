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

The teacher's FPN features come from the ``backbone`` output the distiller already captures
(the teacher stops there), and only the teacher's head parts a term needs run on them, under
``torch.no_grad()``: RetinaNet's regression branch (not its classification branch), Faster
R-CNN's box RoI head (not its RPN). FCOS and segmentation models have no such term.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN, RetinaNet

from maskd.errors import UserKeyError, UserRuntimeError, UserTypeError, UserValueError

__all__ = [
    "FEATURES_LAYER",
    "HEAD_KD_MODES",
    "HeadKD",
    "HeadKDMode",
    "RCNNSmoothL1HeadKD",
    "RetinaNetL1HeadKD",
    "backbone_features",
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


def backbone_features(teacher_levels: Mapping[str, Tensor]) -> OrderedDict[str, Tensor]:
    """The ``backbone`` output rebuilt from captured levels (``backbone:0`` → key ``"0"``).

    A lone tensor (level ``backbone``) becomes ``{"0": tensor}``, as torchvision does.

    Raises:
        KeyError: no level of the ``backbone`` layer was captured.
    """
    feats: OrderedDict[str, Tensor] = OrderedDict()
    for name, value in teacher_levels.items():
        if name == FEATURES_LAYER:
            feats["0"] = value
        elif name.startswith(FEATURES_LAYER + ":"):
            feats[name[len(FEATURES_LAYER) + 1 :]] = value
    if not feats:
        raise UserKeyError(
            f"no teacher level of layer {FEATURES_LAYER!r} among {list(teacher_levels)}: "
            "head KD needs the teacher's backbone output"
        )
    return feats


class HeadKD(ABC):
    """One head-output distillation term between a student and a frozen teacher detector.

    Not an ``nn.Module``: it holds no parameters and only refers to the two models' modules
    (which the distiller owns). Use::

        with head_kd.capture():          # hooks on the student for one training forward
            losses = student(images, targets)
        loss = head_kd.loss(teacher_levels)  # teacher levels incl. "backbone:<key>"

    Args:
        student: the detector being trained.
        teacher: the frozen detector (its head runs in its current mode, under no_grad).
        weight: scale of the term.
    """

    mode: str = ""
    teacher_layers: tuple[str, ...] = (FEATURES_LAYER,)
    """Teacher layers whose outputs :meth:`loss` needs; the teacher must run until they fire."""

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
        self._captured: dict[str, Any] = {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mode={self.mode!r}, weight={self.weight})"

    @contextmanager
    def capture(self) -> Iterator[HeadKD]:
        """Hooks on the student that record what :meth:`loss` needs from one forward."""
        self._captured = {}
        handles = self._register()
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    @abstractmethod
    def _register(self) -> list[Any]:
        """Register the student hooks; return their handles."""

    def _record(self, key: str, value: Any) -> None:
        if key in self._captured:
            raise UserRuntimeError(
                f"head KD: the student's {key} ran twice in one forward; head KD needs one "
                "training forward per capture"
            )
        self._captured[key] = value

    def _take(self, *keys: str) -> list[Any]:
        captured, self._captured = self._captured, {}
        missing = [k for k in keys if k not in captured]
        if missing:
            raise UserRuntimeError(
                f"head KD ({self.mode}): the student's forward did not produce {missing}; "
                "head KD runs on a training-mode forward inside capture()"
            )
        return [captured[k] for k in keys]

    @abstractmethod
    def loss(self, teacher_levels: Mapping[str, Tensor]) -> Tensor:
        """The weighted scalar term from the last captured student forward.

        Args:
            teacher_levels: the teacher's captured levels, ``{level name: tensor}`` in
                :class:`~maskd.taps.FeatureTaps` naming; must hold the ``backbone`` levels.
        """


class RetinaNetL1HeadKD(HeadKD):
    """L1 on RetinaNet's box-regression head outputs, summed over FPN levels of per-level means.

    Student ``head.regression_head`` output ``s`` and teacher output ``t``, both
    ``[N, A_total, 4]`` with ``A_total = Σ_l H_l · W_l · A``; split per level ``l`` into
    ``[N, H_l · W_l · A, 4]``: ``loss = weight · Σ_l mean |s_l − t_l|``.
    The teacher's regression branch runs on its own FPN features under ``torch.no_grad()``.
    """

    mode = "retinanet_l1"

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

    def _register(self) -> list[Any]:
        def hook(module: nn.Module, inputs: Any, output: Tensor) -> None:
            sizes = [int(x.shape[-2] * x.shape[-1]) for x in inputs[0]]
            self._record("regression_head", (output, sizes))

        return [self.student.head.regression_head.register_forward_hook(hook)]

    def loss(self, teacher_levels: Mapping[str, Tensor]) -> Tensor:
        ((s, s_sizes),) = self._take("regression_head")
        feats = list(backbone_features(teacher_levels).values())
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

    def _register(self) -> list[Any]:
        heads = self.student.roi_heads

        def pool_hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if len(args) < 3:
                raise UserRuntimeError(
                    "head KD: roi_heads.box_roi_pool must be called as "
                    "(features, proposals, image_sizes)"
                )
            proposals = [p.detach() for p in args[1]]
            sizes = [tuple(int(v) for v in s) for s in args[2]]
            self._record("proposals", (proposals, sizes))

        def predictor_hook(module: nn.Module, inputs: Any, output: Any) -> None:
            self._record("box_predictor", output)

        return [
            heads.box_roi_pool.register_forward_pre_hook(pool_hook),
            heads.box_predictor.register_forward_hook(predictor_hook),
        ]

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

    def loss(self, teacher_levels: Mapping[str, Tensor]) -> Tensor:
        (proposals, sizes), (logits, s) = self._take("proposals", "box_predictor")
        t = self.teacher_box_regression(backbone_features(teacher_levels), proposals, sizes)
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
