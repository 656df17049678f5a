"""What every stage-2 distillation term shares: what it records, its weight, its output.

A term is an ``nn.Module`` that names what it reads from the student's training forward and
from the frozen teacher's forward (:class:`~maskd.recorder.Record` objects), is set up once
from a dry run of both models, and turns one step's records into

    {"loss_<name>": weighted loss, "<name>/<level>": unweighted level value, ...}

Keys without a ``/`` are losses: the caller sums them (:func:`total_loss`), together with the
student's own task losses. Keys with a ``/`` are detached per-level diagnostics, logged only.

:class:`FeatureTerm` is the common case: it compares the levels of one student layer with
those of one teacher layer (matched in order, e.g. the five FPN outputs), each student level
passed through the term's connector first (:mod:`maskd.terms.connectors`); its loss per level
is summed over levels and multiplied by ``weight``.
"""

from __future__ import annotations

from abc import abstractmethod
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maskd._checks import check_number
from maskd.errors import UserRuntimeError, UserTypeError, UserValueError
from maskd.recorder import Record, Recorder
from maskd.taps import flatten_output, level_key
from maskd.terms.connectors import AlignMode, build_connector

__all__ = [
    "DryRun",
    "FeatureTerm",
    "TemperatureTerm",
    "Term",
    "TermContext",
    "TermInputs",
    "is_diagnostic",
    "total_loss",
]


def is_diagnostic(key: str) -> bool:
    """Whether an output key is a per-level diagnostic (``"<name>/<level>"``), not a loss."""
    return "/" in key


def total_loss(losses: Mapping[str, Tensor]) -> Tensor:
    """The objective of a loss dict: the sum of every value whose key has no ``/``.

    Works on any task model's or :class:`~maskd.Distiller`'s training output; the per-level
    diagnostics (``"maskd/backbone.fpn:0"``) are already inside their term's loss and are
    left out. Summed in float32, in the dict's order.

    Raises:
        ValueError: there is no loss in ``losses``.
    """
    values = [v.float() for k, v in losses.items() if not is_diagnostic(k)]
    if not values:
        raise UserValueError(f"no loss to sum: every key has a '/' ({list(losses)})")
    return torch.stack(values).sum()


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


@dataclass
class TermInputs:
    """One training step as the terms see it.

    Attributes:
        student: the student's recorder after its training forward (every term's records).
        teacher: the teacher's recorder after its ``no_grad`` forward on the same images;
            ``teacher.model`` is the frozen teacher, for terms that run one of its heads.
        context: the batch's boxes and padded size (:class:`TermContext`).
    """

    student: Recorder
    teacher: Recorder
    context: TermContext = field(default_factory=TermContext)


@dataclass(frozen=True)
class DryRun:
    """The levels of one dry run of both models (eval mode, ``no_grad``), for sizing terms.

    Attributes:
        student: ``{student layer path: {level name: [N, C, H, W]}}``, levels in output order.
        teacher: the same for the teacher's layers.
    """

    student: Mapping[str, OrderedDict[str, Tensor]]
    teacher: Mapping[str, OrderedDict[str, Tensor]]


class Term(nn.Module):
    """A stage-2 distillation term.

    Subclasses set :attr:`kind`, say what they record (:meth:`student_records`,
    :meth:`teacher_records`; :meth:`layers` for the dry run), check the two models and build
    their modules in :meth:`setup`, and return the loss dict from :meth:`forward`.

    Args:
        weight: multiplies the term's loss (a finite number >= 0).
        name: the loss is ``loss_<name>``, its per-level values ``<name>/<level>``; default:
            the term's kind. No ``/`` in it.
    """

    kind: ClassVar[str] = ""

    def __init__(self, weight: float = 1.0, name: str | None = None) -> None:
        super().__init__()
        check_number(weight, f"{self.kind} term: weight", low=0)
        if name is not None and (not isinstance(name, str) or not name or "/" in name):
            raise UserValueError(
                f"{self.kind} term: name must be a non-empty string without '/', got {name!r}"
            )
        self.weight = float(weight)
        self.name = name or self.kind

    def layers(self) -> tuple[list[str], list[str]]:
        """The student and teacher layer paths whose dry-run levels :meth:`setup` needs."""
        return [], []

    def student_records(self) -> dict[str, Record]:
        """What the term reads from the student's training forward."""
        return {}

    def teacher_records(self) -> dict[str, Record]:
        """What the term reads from the teacher's forward (which stops once all is taken)."""
        return {}

    def setup(self, student: nn.Module, teacher: nn.Module, dry: DryRun) -> None:
        """Check the two models and build what the term owns (called once, before training)."""

    def set_step(self, step: int) -> None:
        """The number of optimizer steps taken so far (for terms that change over training)."""

    @abstractmethod
    def forward(self, inputs: TermInputs) -> dict[str, Tensor]:
        """``{"loss_<name>": weighted loss, "<name>/<level>": detached level value, ...}``."""


class FeatureTerm(Term):
    """A distillation term over the levels of one student layer and one teacher layer.

    Args:
        student: the student layer path (``named_modules()`` name).
        teacher: the teacher layer path.
        weight: multiplies the sum of the level losses.
        align: ``True`` a 1x1 conv per level from student to teacher channels, ``False``
            the identity (equal channels needed), ``"auto"`` a conv only where they differ.
        resize: bilinearly resize each aligned student level to the teacher level's spatial
            size instead of failing when they differ.
        levels: the levels to distil, by their key in the layer's output (a dict's keys, a
            list's positions: ``["0", "1", "2"]`` of an FPN); ``None``: every level. The
            student's levels are matched by position.
        name: the loss is logged as ``loss_<name>``; default: the term's kind.
    """

    default_align: ClassVar[AlignMode] = True

    def __init__(
        self,
        student: str,
        teacher: str,
        weight: float = 1.0,
        align: AlignMode | None = None,
        resize: bool = False,
        levels: Sequence[str | int] | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(weight, name)
        if not isinstance(student, str) or not isinstance(teacher, str):
            raise UserTypeError(
                f"{self.kind} term: student and teacher must be layer paths (str), got "
                f"{student!r} and {teacher!r}"
            )
        if not isinstance(resize, bool):
            raise UserTypeError(f"{self.kind} term: resize must be true or false, got {resize!r}")
        self.student = student
        self.teacher = teacher
        self.align_mode: AlignMode = self.default_align if align is None else align
        self.resize = resize
        self.only = _level_keys(levels, self.kind)
        self.levels: list[str] = []  # the distilled teacher levels' names
        self.level_index: list[int] = []  # their positions among all the layer's levels
        self.student_levels: list[str] = []  # every level of the student layer (dry run)
        self.teacher_levels: list[str] = []  # every level of the teacher layer (dry run)
        self.connectors = nn.ModuleList()

    def extra_repr(self) -> str:
        only = "" if self.only is None else f", levels={self.only}"
        return (
            f"{self.student} -> {self.teacher}, weight={self.weight}, align={self.align_mode}{only}"
        )

    def layers(self) -> tuple[list[str], list[str]]:
        return [self.student], [self.teacher]

    def student_records(self) -> dict[str, Record]:
        return {self.student: Record(self.student)}

    def teacher_records(self) -> dict[str, Record]:
        return {self.teacher: Record(self.teacher)}

    def setup(self, student: nn.Module, teacher: nn.Module, dry: DryRun) -> None:
        s_levels, t_levels = dry.student[self.student], dry.teacher[self.teacher]
        if len(s_levels) != len(t_levels):
            raise UserValueError(
                f"{self.name} term: student layer {self.student!r} has {len(s_levels)} levels "
                f"{list(s_levels)} but teacher layer {self.teacher!r} has {len(t_levels)} "
                f"{list(t_levels)}"
            )
        self.student_levels, self.teacher_levels = list(s_levels), list(t_levels)
        self.level_index = self._select(self.teacher_levels)
        s_items, t_items = list(s_levels.items()), list(t_levels.items())
        pairs = [(s_items[i], t_items[i]) for i in self.level_index]
        for (s_name, s), (t_name, t) in pairs:
            self._check_spatial(s_name, t_name, s, t)
        self.build([s for (_, s), _ in pairs], [t for _, (_, t) in pairs],
                   [name for _, (name, _) in pairs])  # fmt: skip

    def _select(self, names: list[str]) -> list[int]:
        """The positions of the distilled levels among the teacher layer's level names."""
        if self.only is None:
            return list(range(len(names)))
        if names == [self.teacher]:
            raise UserValueError(
                f"{self.name} term: levels {self.only} given, but teacher layer "
                f"{self.teacher!r} returns one tensor, not several levels; leave levels unset"
            )
        keys = [level_key(self.teacher, name) for name in names]
        unknown = [k for k in self.only if k not in keys]
        if unknown:
            raise UserValueError(
                f"{self.name} term: levels {unknown} are not levels of teacher layer "
                f"{self.teacher!r}; its levels are {keys}"
            )
        return [i for i, k in enumerate(keys) if k in self.only]

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

    def _check_spatial(self, s_name: str, t_name: str, s: Tensor, t: Tensor) -> None:
        if s.shape[0] != t.shape[0]:
            raise UserValueError(
                f"{self.name} term: student level {s_name!r} {tuple(s.shape)} and teacher level "
                f"{t_name!r} {tuple(t.shape)} have different batch sizes"
            )
        if s.shape[-2:] != t.shape[-2:] and not self.resize:
            raise UserValueError(
                f"{self.name} term: student level {s_name!r} has spatial size "
                f"{tuple(s.shape[-2:])} (shape {tuple(s.shape)}) but teacher level {t_name!r} "
                f"has {tuple(t.shape[-2:])} (shape {tuple(t.shape)}); distil levels of equal "
                "size or set the term's resize to true"
            )

    def recorded_levels(self, inputs: TermInputs) -> tuple[list[Tensor], list[Tensor]]:
        """The student's and the teacher's levels of this step, checked against the dry run."""
        s_items = flatten_output(self.student, inputs.student[self.student])
        t_items = flatten_output(self.teacher, inputs.teacher[self.teacher])
        s_names = [name for name, _ in s_items]
        if s_names != self.student_levels:
            raise UserRuntimeError(
                f"{self.name} term: student levels {s_names} differ from those of the dry run "
                f"{self.student_levels}"
            )
        if len(t_items) != len(self.teacher_levels):
            raise UserRuntimeError(
                f"{self.name} term: teacher levels {[n for n, _ in t_items]} differ from those "
                f"of the dry run {self.teacher_levels}"
            )
        pairs = [(s_items[i], t_items[i]) for i in self.level_index]
        for (s_name, s), (t_name, t) in pairs:
            self._check_spatial(s_name, t_name, s, t)
        return [s for (_, s), _ in pairs], [t for _, (_, t) in pairs]

    def forward(self, inputs: TermInputs) -> dict[str, Tensor]:
        student, teacher = self.recorded_levels(inputs)
        return self.compare(student, teacher, inputs.context)

    def aligned(self, s: Tensor, index: int, size: torch.Size) -> Tensor:
        """Student level ``index`` through its connector, resized to ``size`` if it differs."""
        s = self.connectors[index](s)
        if s.shape[-2:] != size:
            s = F.interpolate(s, size=size, mode="bilinear", align_corners=False)
        return s

    @abstractmethod
    def level_loss(self, s: Tensor, t: Tensor, index: int, ctx: TermContext) -> Tensor:
        """The unweighted loss of level ``index``: ``s`` aligned ``[N, C_t, H, W]``, ``t``
        the teacher's level (no gradient)."""

    def compare(
        self, student: Sequence[Tensor], teacher: Sequence[Tensor], ctx: TermContext
    ) -> dict[str, Tensor]:
        """``{"loss_<name>": weight · Σ_levels loss, "<name>/<level>": level loss}``.

        Args:
            student: the student layer's levels ``[N, C_s, H, W]``, before the connectors.
            teacher: the teacher layer's levels ``[N, C_t, H, W]``, same order.
            ctx: the batch's boxes and padded size.
        """
        total: Tensor | None = None
        out: dict[str, Tensor] = {}
        for i, (s, t) in enumerate(zip(student, teacher, strict=True)):
            loss = self.level_loss(self.aligned(s, i, t.shape[-2:]), t.detach(), i, ctx)
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
        check_number(tau, f"{self.kind} term: tau", low=0, low_open=True)
        self.tau = float(tau)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, tau={self.tau}"


def _level_keys(levels: object, kind: str) -> list[str] | None:
    """``levels`` as a list of distinct string keys (``None`` stays ``None``)."""
    if levels is None:
        return None
    if isinstance(levels, str | int) or not isinstance(levels, Sequence) or not levels:
        raise UserTypeError(
            f'{kind} term: levels must be a non-empty list of level keys (e.g. ["0", "1"]), '
            f"got {levels!r}"
        )
    keys = []
    for key in levels:
        if isinstance(key, bool) or not isinstance(key, str | int):
            raise UserTypeError(
                f"{kind} term: levels must be level keys (str or int), got {key!r} in {levels!r}"
            )
        keys.append(str(key))
    if len(set(keys)) != len(keys):
        raise UserValueError(f"{kind} term: levels {keys} name a level twice")
    return keys
