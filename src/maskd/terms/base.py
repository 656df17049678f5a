"""What every stage-2 distillation term shares: its sources, align connectors and weight.

A term compares the levels of one student layer with those of one teacher layer (matched in
order, e.g. the five FPN outputs). The student level goes through the term's connector
first (:mod:`maskd.terms.connectors`); the term's loss per level is then summed over levels
and multiplied by ``weight``.

:meth:`FeatureTerm.forward` returns ``{"loss_<name>": weighted total}`` plus one detached
diagnostic per level, ``{"<name>/<level>": unweighted level loss}``. Keys that start with
``loss`` are summed into the objective; the others are logged only (mmengine's rule).
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

from maskd.errors import UserTypeError, UserValueError
from maskd.terms.connectors import AlignMode, build_connector

__all__ = ["FeatureTerm", "TemperatureTerm", "TermContext"]


@dataclass
class TermContext:
    """What a term may need besides the features.

    Attributes:
        boxes: per image, the ground-truth boxes ``[B_i, 4]`` (x1, y1, x2, y2) in the
            coordinates of the model's (resized, padded) input; ``None`` when the student has
            no torchvision-style detection transform.
        input_size: ``(H, W)`` of that padded input batch, or ``None``.
    """

    boxes: list[Tensor] | None = None
    input_size: tuple[int, int] | None = None


class FeatureTerm(nn.Module):
    """A distillation term over the levels of one student layer and one teacher layer.

    Args:
        student: the student layer path (``named_modules()`` name).
        teacher: the teacher layer path.
        weight: multiplies the sum of the level losses.
        align: ``True`` a 1x1 conv per level from student to teacher channels, ``False``
            the identity (equal channels needed), ``"auto"`` a conv only where they differ.
        name: the loss is logged as ``loss_<name>``; default: the term's kind.
    """

    kind: ClassVar[str] = ""
    default_align: ClassVar[AlignMode] = True

    def __init__(
        self,
        student: str,
        teacher: str,
        weight: float = 1.0,
        align: AlignMode | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(student, str) or not isinstance(teacher, str):
            raise UserTypeError(
                f"{self.kind} term: student and teacher must be layer paths (str), got "
                f"{student!r} and {teacher!r}"
            )
        if isinstance(weight, bool) or not isinstance(weight, int | float):
            raise UserTypeError(f"{self.kind} term: weight must be a number, got {weight!r}")
        if not math.isfinite(weight) or weight < 0:
            raise UserValueError(f"{self.kind} term: weight must be finite and >= 0, got {weight}")
        self.student = student
        self.teacher = teacher
        self.weight = float(weight)
        self.align_mode: AlignMode = self.default_align if align is None else align
        self.name = name or self.kind
        self.levels: list[str] = []
        self.connectors = nn.ModuleList()

    def extra_repr(self) -> str:
        return f"{self.student} -> {self.teacher}, weight={self.weight}, align={self.align_mode}"

    def build(
        self, student: Sequence[Tensor], teacher: Sequence[Tensor], levels: list[str]
    ) -> None:
        """Size the connectors (and any per-level module) from one dry run's levels.

        Args:
            student: the student layer's levels, ``[N, C_s, H, W]`` each.
            teacher: the teacher layer's levels, ``[N, C_t, H, W]`` each, same order.
            levels: the teacher level names, used in diagnostics.
        """
        self.levels = list(levels)
        self.connectors = nn.ModuleList(
            build_connector(
                s.shape[1], t.shape[1], self.align_mode, f"{self.name} term, {name}"
            ).to(s.device)
            for s, t, name in zip(student, teacher, levels, strict=True)
        )

    @abstractmethod
    def level_loss(self, s: Tensor, t: Tensor, index: int, ctx: TermContext) -> Tensor:
        """The unweighted loss of level ``index``: ``s`` aligned ``[N, C_t, H, W]``, ``t``
        the teacher's level (no gradient)."""

    def forward(
        self, student: Sequence[Tensor], teacher: Sequence[Tensor], ctx: TermContext
    ) -> dict[str, Tensor]:
        """``{"loss_<name>": weight · Σ_levels loss, "<name>/<level>": level loss}``."""
        total: Tensor | None = None
        out: dict[str, Tensor] = {}
        for i, (s, t, connector) in enumerate(zip(student, teacher, self.connectors, strict=True)):
            s = connector(s)
            if s.shape[-2:] != t.shape[-2:]:
                s = F.interpolate(s, size=t.shape[-2:], mode="bilinear", align_corners=False)
            loss = self.level_loss(s, t.detach(), i, ctx)
            out[f"{self.name}/{self.levels[i]}"] = loss.detach()
            total = loss if total is None else total + loss
        assert total is not None
        return {f"loss_{self.name}": total * self.weight, **out}


class TemperatureTerm(FeatureTerm):
    """A term whose distributions are softened by a temperature ``tau`` (> 0).

    Args:
        tau: the temperature τ.
        **kwargs: :class:`FeatureTerm`'s.
    """

    def __init__(self, *args: object, tau: float = 1.0, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        if isinstance(tau, bool) or not isinstance(tau, int | float) or not tau > 0:
            raise UserValueError(f"{self.kind} term: tau must be a number > 0, got {tau!r}")
        if not math.isfinite(tau):
            raise UserValueError(f"{self.kind} term: tau must be finite, got {tau!r}")
        self.tau = float(tau)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, tau={self.tau}"
