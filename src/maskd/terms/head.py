"""What the head-output terms share: the authors' extra stage-2 KD on a detector's head.

Next to the masked feature loss, the MasKD authors distil the box-regression outputs of two
detectors (``docs/method.md``, "Stage 2"; mmrazor's ``configs/distill/maskd/``), translated
here to torchvision's modules: :mod:`maskd.terms.retinanet_l1` (RetinaNet) and
:mod:`maskd.terms.rcnn_smoothl1` (Faster R-CNN). FCOS and segmentation models have no such
term.

A head term records, from the teacher, its ``backbone`` output (the FPN's ``OrderedDict`` as
the heads receive it; the teacher stops there), and from the student what its head saw and
returned. Only the teacher's head parts the term needs then run on those features, under
``torch.no_grad()``. It has no layer options: it reads fixed parts of torchvision detectors.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, ClassVar

from torch import Tensor, nn

from maskd.errors import UserTypeError, UserValueError
from maskd.recorder import Record
from maskd.terms.base import DryRun, Term

__all__ = ["FEATURES_LAYER", "HeadTerm", "feature_dict"]

FEATURES_LAYER = "backbone"
"""The layer whose output (the FPN features) torchvision detectors feed to their heads."""

SUPPORTED = "RetinaNet (retinanet_l1) and Faster R-CNN (rcnn_smoothl1)"


def feature_dict(features: Any) -> OrderedDict[str, Tensor]:
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


class HeadTerm(Term):
    """A term on the head outputs of one torchvision detector type.

    Args:
        weight: scale of the term (authors: 1).
        name: default: the kind.
    """

    detector: ClassVar[type[nn.Module]] = nn.Module

    @property
    def features(self) -> str:
        """The name of the teacher's ``backbone`` record."""
        return f"{self.kind}/features"

    def teacher_records(self) -> dict[str, Record]:
        return {self.features: Record(FEATURES_LAYER)}

    def setup(self, student: nn.Module, teacher: nn.Module, dry: DryRun) -> None:
        for role, model in (("student", student), ("teacher", teacher)):
            if not isinstance(model, self.detector):
                raise UserValueError(
                    f"{self.kind} term needs a torchvision {self.detector.__name__} {role}, got "
                    f"{type(model).__name__}; head KD exists for {SUPPORTED} only"
                )
        self.check_models(student, teacher)

    def check_models(self, student: nn.Module, teacher: nn.Module) -> None:
        """Refuse two detectors whose head outputs cannot be compared one to one."""
