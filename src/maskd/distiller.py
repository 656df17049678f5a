"""Stage 2: a student, a frozen teacher and a list of distillation terms."""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from maskd._checks import check_number
from maskd.errors import UserTypeError, UserValueError
from maskd.learner import freeze
from maskd.output_cache import OutputCache
from maskd.recorder import Record, Recorder, _module_path, resolve_layers
from maskd.taps import (
    ResizedBatch,
    detection_transform,
    probe_levels,
    resize_records,
    resized_batch,
)
from maskd.terms import (
    DryRun,
    MaskdTerm,
    Term,
    TermContext,
    TermInputs,
    build_term,
    total_loss,
)

__all__ = ["Distiller", "total_loss"]


def _term_context(batch: ResizedBatch | None) -> TermContext:
    """The boxes of the resized batch and its padded size, for the terms that need them."""
    if batch is None or not isinstance(batch.targets, list | tuple):
        return TermContext()
    boxes = [t["boxes"] for t in batch.targets if isinstance(t, dict) and "boxes" in t]
    if len(boxes) != len(batch.targets):
        return TermContext()
    return TermContext(boxes=boxes, input_size=batch.padded)


def _resizing(model: nn.Module) -> str:
    transform = detection_transform(model)
    if transform is None:
        return "no transform"
    return (
        f"min_size={getattr(transform, 'min_size', None)}, "
        f"max_size={getattr(transform, 'max_size', None)}"
    )


def _merge_records(groups: Sequence[Mapping[str, Record]]) -> dict[str, Record]:
    merged: dict[str, Record] = {}
    for group in groups:
        for name, record in group.items():
            if name in merged and merged[name] != record:
                raise UserValueError(
                    f"layer path {name!r} clashes with an internal record of the same name"
                )
            merged[name] = record
    return merged


def _dry_run(
    model: nn.Module, paths: list[str], example_input: Any
) -> dict[str, OrderedDict[str, Tensor]]:
    if not paths:
        return {}
    feats, levels = probe_levels(model, paths, example_input)
    return {path: OrderedDict((n, feats[n]) for n in names) for path, names in levels.items()}


class Distiller(nn.Module):
    """Stage 2: the student's task losses plus a list of distillation terms.

    Each term (:mod:`maskd.terms`: ``maskd``, the peer methods ``fitnet``, ``cwd``, ``fgd``,
    ``logits_kd``, the authors' head terms ``retinanet_l1`` and ``rcnn_smoothl1``) names what
    it reads from the student's training forward and from the teacher's forward; each model
    is read through one :class:`~maskd.recorder.Recorder`, which also records a detector's
    resized batch (boxes for the terms, sizes for the check that both models resized alike).

    The teacher is frozen in place, always in eval mode, runs under ``torch.no_grad()`` and is
    stopped as soon as everything the terms read from it was recorded, so its heads and
    post-processing never run (a head term runs only the head parts it compares). In
    training, a torchvision detector teacher's resizing transform alone follows the
    student's: it draws the same random ``min_size`` per image (multi-scale training).

    Training-mode ``forward(images, targets)`` returns the student's task losses followed by
    every term's output, in term order: ``loss_<name>`` (summed into the objective) and the
    term's detached per-level values ``<name>/<level>`` (logged only; they are already inside
    ``loss_<name>``). The objective is :func:`total_loss` of that dict: every value whose key
    has no ``/``. Eval-mode ``forward(images)`` returns the student's predictions and does not
    run the teacher.

    Layers are checked, and the terms' connectors sized, by a dry run at construction (both
    models in eval mode under ``torch.no_grad()`` on ``example_input``, default one black
    ``[1, 3, 128, 128]`` image); levels and sizes are checked again on every batch.

    Args:
        student: the task model to train.
        teacher: the task model to distil from.
        terms: the distillation terms, as specs ``{"kind": ..., "student": ..., "teacher":
            ..., "weight": ..., options}`` (:func:`maskd.terms.build_term`) or built terms,
            e.g. ``[{"kind": "maskd", "student": "backbone.fpn", "teacher": "backbone.fpn",
            "tokens": learner.tokens(), "weight": 7.0}]``. Names (default: the kind) must
            differ.
        example_input: dry-run input for both models; a tuple is unpacked into arguments.
        teacher_cache: a teacher layer path (e.g. ``"backbone.body"``, a detector's trunk)
            whose output is kept per training sample (:class:`~maskd.output_cache.
            OutputCache`): a sample seen before skips that layer's work. The layer must map
            each sample on its own (a frozen convolutional trunk in eval mode does) and hold
            none of the layers the terms record. Each new sample runs through it alone, so
            the run is reproducible and resumes exactly; the features differ from an
            uncached teacher's by rounding only. The training output then also has
            ``teacher_cache/hits``, the fraction of the batch served from the cache (logged).
        teacher_cache_bytes: the most bytes of outputs the cache holds in memory; later
            samples are computed and not kept there.
        teacher_cache_dir: a folder where the cached layer's outputs are also written and
            looked up (keyed by the layer's weights too), so that runs of one teacher share
            them, one after another or side by side; ``None``: memory only.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        terms: Sequence[Mapping[str, Any] | Term],
        example_input: Any = None,
        teacher_cache: str | None = None,
        teacher_cache_bytes: int = 4 * 2**30,
        teacher_cache_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__()
        for name, model in (("student", student), ("teacher", teacher)):
            if not isinstance(model, nn.Module):
                raise UserTypeError(f"{name} must be an nn.Module, got {type(model).__name__}")
        if student is teacher:
            raise UserValueError("student and teacher must be different modules")
        built = self._build_terms(terms)
        self.student = student
        self.teacher = teacher
        s_paths = list(dict.fromkeys(p for t in built for p in t.layers()[0]))
        t_paths = list(dict.fromkeys(p for t in built for p in t.layers()[1]))
        dry = DryRun(
            student=_dry_run(student, s_paths, example_input),
            teacher=_dry_run(teacher, t_paths, example_input),
        )
        for term in built:
            term.setup(student, teacher, dry)
        self.terms = nn.ModuleList(built)
        self._loss_keys = [f"loss_{t.name}" for t in built]
        freeze(teacher)
        # Each model's one recorder: what every term reads, and the resized batch; the
        # teacher stops once all of it was recorded.
        self._student_recorder = Recorder(
            student,
            _merge_records([*(t.student_records() for t in built), resize_records(student)]),
        )
        self._teacher_recorder = Recorder(
            teacher,
            _merge_records([*(t.teacher_records() for t in built), resize_records(teacher)]),
            stop=True,
        )
        self.teacher_cache: OutputCache | None = None
        if teacher_cache is not None:
            self.teacher_cache = self._teacher_cache(
                teacher_cache, teacher_cache_bytes, teacher_cache_dir
            )
        self.register_load_state_dict_pre_hook(_upgrade_state_dict)
        self.train(self.training)

    def _teacher_cache(
        self, path: str, max_bytes: int, directory: str | os.PathLike[str] | None
    ) -> OutputCache:
        if not isinstance(path, str):
            raise UserTypeError(f"teacher_cache must be a teacher layer path, got {path!r}")
        if not path:
            raise UserValueError("teacher_cache must name a layer inside the teacher, not ''")
        check_number(max_bytes, "teacher_cache_bytes", low=0, integer=True)
        module = resolve_layers(self.teacher, [path])[path]
        recorded = [_module_path(r) for r in self._teacher_recorder.records.values()]
        inside = [layer for layer in recorded if layer.startswith(path + ".")]
        if inside:
            raise UserValueError(
                f"teacher_cache {path!r} holds the teacher layers {inside} that the terms "
                "record, which a cached forward would skip; cache a layer before them"
            )
        cache = OutputCache(module, max_bytes, name=path, directory=directory)
        cache.attach()
        return cache

    @staticmethod
    def _build_terms(terms: object) -> list[Term]:
        if isinstance(terms, str | Mapping | Term) or not isinstance(terms, Sequence):
            raise UserTypeError(
                f"terms must be a list of distillation terms (specs or built terms), got {terms!r}"
            )
        if not terms:
            raise UserValueError("terms is empty: give at least one distillation term")
        built = [build_term(spec) for spec in terms]
        names = [t.name for t in built]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise UserValueError(
                f"term names {repeated} are used twice; give each term of the same kind its "
                "own 'name'"
            )
        return built

    def train(self, mode: bool = True) -> Distiller:
        """Set the student's (and the terms') mode; the teacher always stays in eval."""
        super().train(mode)
        self.teacher.eval()
        return self

    def set_step(self, step: int) -> None:
        """Tell the terms how many optimizer steps were taken (MasKD's custom-mask warm-up)."""
        for term in self.terms:
            term.set_step(step)

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters the optimizer should update: the student's and the terms' modules'."""
        return (p for p in self.parameters() if p.requires_grad)

    def student_state_dict(self) -> dict[str, Tensor]:
        """The student's state dict alone, loadable into a fresh instance of the student."""
        return self.student.state_dict()

    def forward(self, images: Any, targets: Any = None) -> Any:
        """Training: ``{student losses..., "loss_<term>", "<term>/<level>", ...}``; eval:
        the student's predictions."""
        if not self.training:
            return self.student(images) if targets is None else self.student(images, targets)
        try:
            return self._distill(images, targets)
        finally:  # drop the recorded tensors (and the graph they hold) once the step has them
            self._student_recorder.clear()
            self._teacher_recorder.clear()

    def _distill(self, images: Any, targets: Any) -> dict[str, Tensor]:
        t_rec, s_rec = self._teacher_recorder, self._student_recorder
        cache = self.teacher_cache
        before = (cache.hits, cache.misses) if cache is not None else (0, 0)
        with torch.no_grad(), self._teacher_sizes_like_student():
            t_rec.run(images)
        out = s_rec.run(images, targets)
        s_batch = resized_batch(s_rec)
        self._check_sizes(s_batch, resized_batch(t_rec))
        if not isinstance(out, dict):
            raise UserTypeError(
                "in training mode the student must return a dict of losses, got "
                f"{type(out).__name__}; wrap segmenters in maskd.SegmentationTask"
            )
        for key in out:
            if "/" in str(key):
                raise UserValueError(
                    f"the student's loss {key!r} has a '/', which marks the terms' per-level "
                    "values (logged, not summed); rename it"
                )
        for key in self._loss_keys:
            if key in out:
                raise UserValueError(f"the student's losses already contain a {key!r} entry")
        losses = dict(out)
        inputs = TermInputs(s_rec, t_rec, _term_context(s_batch))
        for term in self.terms:
            losses.update(term(inputs))
        if cache is not None:
            hits, misses = cache.hits - before[0], cache.misses - before[1]
            losses["teacher_cache/hits"] = torch.tensor(hits / max(hits + misses, 1))
        return losses

    @contextmanager
    def _teacher_sizes_like_student(self) -> Iterator[None]:
        """In training, the teacher's detection transform draws the sizes the student's will.

        A torchvision detector in training mode picks each image's ``min_size`` at random from
        its list (or keeps the size with ``_skip_resize``), while the teacher stays in eval
        mode, whose transform always takes the last size. So the teacher's transform runs in
        training mode here, on a fork of the CPU RNG: the student then draws the same numbers
        afresh, both see the same sizes (mmdet resizes once, in the data pipeline, for both),
        and the student's random stream is the one it would have alone. With one size and no
        ``_skip_resize`` the result is that of eval mode.
        """
        transform = detection_transform(self.teacher)
        if not self.training or transform is None or detection_transform(self.student) is None:
            yield
            return
        transform.train()
        try:
            with torch.random.fork_rng(devices=[]):
                yield
        finally:
            transform.eval()

    def _check_sizes(self, s_batch: ResizedBatch | None, t_batch: ResizedBatch | None) -> None:
        if s_batch is None or t_batch is None:
            return
        s_sizes, s_pad = s_batch.image_sizes, s_batch.padded
        t_sizes, t_pad = t_batch.image_sizes, t_batch.padded
        if (s_sizes, s_pad) == (t_sizes, t_pad):
            return
        raise UserValueError(
            "the student's and the teacher's detection transforms resized the batch "
            f"differently: student image sizes {s_sizes} (padded {s_pad}), teacher {t_sizes} "
            f"(padded {t_pad}). Give both the same resizing (student {_resizing(self.student)}; "
            f"teacher {_resizing(self.teacher)}): in training the teacher's transform draws its "
            "sizes as the student's does, so give both the same min_size list, max_size and "
            "_skip_resize."
        )


def _upgrade_state_dict(module: Distiller, state: dict[str, Any], prefix: str, *args: Any) -> None:
    """Rename, in place, the entries of a checkpoint written before MasKD was a term.

    That layout kept MasKD's align modules as ``align.<i>`` and its loss (tokens, step) as
    ``loss``, over the levels of every distilled pair in order, and the peer terms as
    ``terms.<j>``. Here the MasKD terms (one per pair, first in the list, as
    :func:`maskd.engine.jobs.distill_terms` makes them) own their connectors and loss.
    """
    old = [k for k in state if k.startswith((f"{prefix}align.", f"{prefix}loss."))]
    if not old:
        return
    terms = list(module.terms)
    maskd = [i for i, t in enumerate(terms) if isinstance(t, MaskdTerm)]
    old_peers = {k for k in state if k.startswith(f"{prefix}terms.")}
    if old_peers:
        raise UserValueError(
            "this checkpoint was written by an earlier maskd with MasKD and peer terms "
            "together, whose optimizer state cannot be matched to today's parameter order; "
            "start the run over (--run.overwrite true)"
        )
    counts = [len(terms[i].levels) for i in maskd]
    token_keys = [k[len(prefix) :].split(".") for k in old if ".tokens." in k]
    old_levels = {int(parts[2]) for parts in token_keys}
    if not maskd or len(old_levels) != sum(counts):
        raise UserValueError(
            f"this checkpoint holds MasKD tokens for {len(old_levels)} levels but the run "
            f"distils {sum(counts)} with MasKD; resume with the options it was written with"
        )
    where: list[tuple[int, int]] = []  # old level index -> (term index, level in the term)
    for i, n in zip(maskd, counts, strict=True):
        where += [(i, j) for j in range(n)]
    for key in old:
        rest = key[len(prefix) :]
        value = state.pop(key)
        if rest == "loss._extra_state":
            for i in maskd:
                state[f"{prefix}terms.{i}.loss._extra_state"] = value
            continue
        group, _, tail = rest.partition(".")  # "align" | "loss"
        if group == "loss":
            _, _, tail = tail.partition(".")  # drop "tokens"
        index, _, name = tail.partition(".")
        i, j = where[int(index)]
        part = "connectors" if group == "align" else "loss.tokens"
        state[f"{prefix}terms.{i}.{part}.{j}.{name}"] = value
