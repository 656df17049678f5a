"""Stage 2: masked distillation of a student from a frozen teacher through frozen tokens."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maskd.errors import UserRuntimeError, UserTypeError, UserValueError
from maskd.head_kd import HeadKD, HeadKDMode, build_head_kd
from maskd.learner import freeze
from maskd.losses import MasKDLoss
from maskd.recorder import Record, Recorder
from maskd.taps import (
    ResizedBatch,
    detection_transform,
    flatten_output,
    probe_levels,
    recorded_levels,
    resize_records,
    resized_batch,
)
from maskd.terms import FeatureTerm, TermContext, build_term
from maskd.tokens import ReceptiveTokens

__all__ = ["Distiller"]


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


def _merge_records(*groups: Mapping[str, Record]) -> dict[str, Record]:
    merged: dict[str, Record] = {}
    for group in groups:
        for name, record in group.items():
            if name in merged and merged[name] != record:
                raise UserValueError(
                    f"layer path {name!r} clashes with an internal record of the same name"
                )
            merged[name] = record
    return merged


class Distiller(nn.Module):
    """Stage 2 of MasKD: the student's task losses plus the masked distillation loss.

    For every pair ``student layer → teacher layer`` the levels of both outputs are matched in
    order. Each student level ``[N, C_s, H, W]`` goes through its align module (a 1x1 conv to
    the teacher's ``C_t`` channels, or the identity with ``align=False``) and is compared with
    the teacher level ``[N, C_t, H, W]`` by :class:`~maskd.losses.MasKDLoss`, whose masks come
    from the teacher's frozen tokens.

    The teacher is frozen in place, always in eval mode, runs under ``torch.no_grad()`` and is
    stopped as soon as its last tapped layer has produced its output, so its heads and
    post-processing never run. The tokens are copied and frozen (the caller's are untouched).
    In training, a torchvision detector teacher's resizing transform alone follows the
    student's: it draws the same random ``min_size`` per image (multi-scale training).

    With ``head_kd`` set (torchvision RetinaNet / Faster R-CNN only, see
    :mod:`maskd.head_kd`), the teacher also runs until its ``backbone`` output, and only the
    head parts the term needs (RetinaNet's regression branch; Faster R-CNN's box RoI head fed
    the student's sampled proposals) run on those features, still under ``torch.no_grad()``.
    Each model is read through one :class:`~maskd.recorder.Recorder`: the distilled layers,
    a detector's resized batch (boxes for the terms, sizes for the check that both models
    resized alike) and what head KD reads (the teacher's FPN dict as its heads take it).

    Training-mode ``forward(images, targets)`` returns the student's task losses plus
    ``loss_maskd`` (and ``loss_head_kd`` when head KD is on); the total to optimise is the sum
    of that dict's values. The per-level (unweighted, detached) values of ``loss_maskd`` are
    stored in :attr:`last_level_losses` as ``{"loss_maskd/<teacher level>": value}``, for
    logging only — they are already inside ``loss_maskd`` and must not be added again.
    Eval-mode ``forward(images)`` returns the student's predictions and does not run the
    teacher.

    Levels, channels and spatial sizes are checked by a dry run at construction (both models
    in eval mode under ``torch.no_grad()`` on ``example_input``, default one black
    ``[1, 3, 128, 128]`` image), which also sizes the align modules; sizes are checked again
    on every batch.

    Args:
        student: the task model to train.
        teacher: the task model to distil from.
        pairs: ``{student layer path: teacher layer path}``.
        tokens: ``{teacher layer path: [ReceptiveTokens per level]}``, as
            :meth:`maskd.learner.TokenLearner.tokens` and :func:`maskd.token_io.load_tokens`
            give; layers not in ``pairs`` are ignored.
        loss_weight: scale of the masked distillation loss (summed over levels).
        custom_mask_warmup: training steps before masks are multiplied by the student-side
            masks (computed on the aligned student feature); ``None`` never does.
        align: 1x1 conv align modules; ``False`` uses the identity and requires equal channels.
        resize: bilinearly resize student levels to the teacher's spatial size instead of
            failing when they differ.
        eps: added to each mask's area (the authors use 1e-5 for segmentation).
        example_input: dry-run input for both models; a tuple is unpacked into arguments.
        head_kd: the authors' extra head-output KD term: ``"retinanet_l1"`` (L1 on RetinaNet's
            box-regression outputs), ``"rcnn_smoothl1"`` (SmoothL1 on Faster R-CNN's RoI box
            regression, the teacher's RoI head fed the student's proposals), ``"auto"`` (the
            one for the student's type) or ``None`` (off). Other models raise ``ValueError``.
        head_kd_weight: scale of the head-KD term (authors: 1).
        layer_weights: ``{teacher layer path: multiplier}`` for the masked loss of each of the
            layer's levels (default 1), e.g. ``{"model.aux_classifier.4": 0.4}`` as the authors
            weight the auxiliary head's logits in segmentation.
        terms: further distillation terms (FitNet, CWD, FGD, logits KD; see
            :mod:`maskd.terms`), as specs ``{"kind": ..., "student": ..., "teacher": ...,
            "weight": ..., options}`` or built terms. Each adds ``loss_<name>`` to the
            output and its per-level values to :attr:`last_level_losses` as
            ``<name>/<teacher level>``. With ``terms``, ``pairs`` and ``tokens`` may be
            ``None`` (no MasKD loss: a peer method alone).
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        pairs: Mapping[str, str] | None,
        tokens: Mapping[str, Sequence[ReceptiveTokens]] | None,
        loss_weight: float = 1.0,
        custom_mask_warmup: int | None = None,
        align: bool = True,
        resize: bool = False,
        eps: float = 0.0,
        example_input: Any = None,
        head_kd: HeadKDMode | None = None,
        head_kd_weight: float = 1.0,
        layer_weights: Mapping[str, float] | None = None,
        terms: Sequence[Mapping[str, Any] | FeatureTerm] | None = None,
    ) -> None:
        super().__init__()
        for name, model in (("student", student), ("teacher", teacher)):
            if not isinstance(model, nn.Module):
                raise UserTypeError(f"{name} must be an nn.Module, got {type(model).__name__}")
        if student is teacher:
            raise UserValueError("student and teacher must be different modules")
        built = self._build_terms(terms)
        if pairs is None and not built:
            raise UserTypeError("give pairs and tokens (MasKD), terms, or both")
        pairs = self._check_pairs(pairs) if pairs is not None else {}
        if pairs and tokens is None:
            raise UserTypeError("pairs need tokens: {teacher layer: [ReceptiveTokens per level]}")
        self.student = student
        self.teacher = teacher
        self.pairs: dict[str, str] = pairs
        self.resize = bool(resize)

        s_paths = list(dict.fromkeys([*pairs, *(t.student for t in built)]))
        t_paths = list(dict.fromkeys([*pairs.values(), *(t.teacher for t in built)]))
        s_feats, s_levels = probe_levels(student, s_paths, example_input)
        t_feats, t_levels = probe_levels(teacher, t_paths, example_input)
        self._s_levels, self._t_levels = s_levels, t_levels
        for term in built:
            s_list = [s_feats[n] for n in s_levels[term.student]]
            t_names = t_levels[term.teacher]
            if len(s_list) != len(t_names):
                raise UserValueError(
                    f"{term.name} term: student layer {term.student!r} has {len(s_list)} levels "
                    f"{s_levels[term.student]} but teacher layer {term.teacher!r} has "
                    f"{len(t_names)} {t_names}"
                )
            for s_name, t_name in zip(s_levels[term.student], t_names, strict=True):
                self._check_spatial(s_name, t_name, s_feats[s_name], t_feats[t_name])
            term.build(s_list, [t_feats[n] for n in t_names], t_names)
        self.terms = nn.ModuleList(built)
        self.student_levels: list[str] = []
        self.teacher_levels: list[str] = []
        for s_path, t_path in pairs.items():
            if len(s_levels[s_path]) != len(t_levels[t_path]):
                raise UserValueError(
                    f"student layer {s_path!r} has {len(s_levels[s_path])} levels "
                    f"{s_levels[s_path]} but teacher layer {t_path!r} has "
                    f"{len(t_levels[t_path])} {t_levels[t_path]}"
                )
            self.student_levels += s_levels[s_path]
            self.teacher_levels += t_levels[t_path]
        t_levels = {path: t_levels[path] for path in pairs.values()}
        level_tokens = self._check_tokens(tokens, t_levels, t_feats) if pairs else []

        aligns: list[nn.Module] = []
        for s_name, t_name in zip(self.student_levels, self.teacher_levels, strict=True):
            s, t = s_feats[s_name], t_feats[t_name]
            self._check_spatial(s_name, t_name, s, t)
            c_s, c_t = s.shape[1], t.shape[1]
            if align:
                aligns.append(nn.Conv2d(c_s, c_t, kernel_size=1).to(s.device))
            elif c_s != c_t:
                raise UserValueError(
                    f"align=False needs equal channels, but student level {s_name!r} has "
                    f"{c_s} (shape {tuple(s.shape)}) and teacher level {t_name!r} has {c_t} "
                    f"(shape {tuple(t.shape)})"
                )
            else:
                aligns.append(nn.Identity())
        self.align = nn.ModuleList(aligns)
        self.loss: MasKDLoss | None = None
        if pairs:
            self.loss = MasKDLoss(
                [
                    copy.deepcopy(tok).to(t_feats[name].device)
                    for tok, name in zip(level_tokens, self.teacher_levels, strict=True)
                ],
                loss_weight=loss_weight,
                custom_mask_warmup=custom_mask_warmup,
                eps=eps,
                level_weights=self._level_weights(layer_weights, t_levels),
            )
        elif layer_weights is not None:
            raise UserValueError("layer_weights apply to the MasKD loss, which needs pairs")
        self.head_kd: HeadKD | None = None
        if head_kd is not None:
            self.head_kd = build_head_kd(head_kd, student, teacher, head_kd_weight)
        freeze(teacher)
        # Each model's one recorder: the distilled layers (by path), its resized batch, and
        # what head KD reads; the teacher stops once all of it was recorded.
        self._s_paths, self._t_paths = s_paths, t_paths
        s_records = [{p: Record(p) for p in s_paths}, resize_records(student)]
        t_records = [{p: Record(p) for p in t_paths}, resize_records(teacher)]
        if self.head_kd is not None:
            s_records.append(self.head_kd.student_records)
            t_records.append(self.head_kd.teacher_records)
        self._student_recorder = Recorder(student, _merge_records(*s_records))
        self._teacher_recorder = Recorder(teacher, _merge_records(*t_records), stop=True)
        self.last_level_losses: dict[str, Tensor] = {}
        self.train(self.training)

    @staticmethod
    def _build_terms(terms: object) -> list[FeatureTerm]:
        if terms is None:
            return []
        if isinstance(terms, str | Mapping) or not isinstance(terms, Sequence):
            raise UserTypeError(f"terms must be a list of term specs, got {terms!r}")
        built = [build_term(spec) for spec in terms]
        names = [t.name for t in built]
        taken = sorted({n for n in names if names.count(n) > 1 or n in ("maskd", "head_kd")})
        if taken:
            raise UserValueError(
                f"term names {taken} are used twice or reserved (maskd, head_kd); give each "
                "term of the same kind its own 'name'"
            )
        return built

    @staticmethod
    def _check_pairs(pairs: object) -> dict[str, str]:
        if not isinstance(pairs, Mapping) or not pairs:
            raise UserTypeError(
                f"pairs must be a non-empty mapping {{student layer: teacher layer}}, got {pairs!r}"
            )
        for s_path, t_path in pairs.items():
            if not isinstance(s_path, str) or not isinstance(t_path, str):
                raise UserTypeError(f"pairs must map str to str, got {s_path!r}: {t_path!r}")
        teachers = list(pairs.values())
        repeated = sorted({t for t in teachers if teachers.count(t) > 1})
        if repeated:
            raise UserValueError(f"teacher layers {repeated} appear more than once in pairs")
        return dict(pairs)

    def _level_weights(
        self, layer_weights: object, t_levels: dict[str, list[str]]
    ) -> list[float] | None:
        """Per-level multipliers, in level order, from ``{teacher layer: weight}``."""
        if layer_weights is None:
            return None
        if not isinstance(layer_weights, Mapping):
            raise UserTypeError(
                "layer_weights must be a mapping {teacher layer: weight}, got "
                f"{type(layer_weights).__name__}"
            )
        unknown = sorted(str(k) for k in layer_weights if k not in t_levels)
        if unknown:
            raise UserValueError(
                f"layer_weights names {unknown}, which are not distilled teacher layers "
                f"{list(t_levels)}"
            )
        return [
            layer_weights.get(path, 1.0) for path in self.pairs.values() for _ in t_levels[path]
        ]

    def _check_tokens(
        self,
        tokens: object,
        t_levels: dict[str, list[str]],
        t_feats: Mapping[str, Tensor],
    ) -> list[ReceptiveTokens]:
        if not isinstance(tokens, Mapping):
            raise UserTypeError(
                "tokens must be a mapping {teacher layer: [ReceptiveTokens per level]}, got "
                f"{type(tokens).__name__}"
            )
        found: list[ReceptiveTokens] = []
        for t_path, names in t_levels.items():
            if t_path not in tokens:
                raise UserValueError(
                    f"no tokens for teacher layer {t_path!r}; tokens cover {list(tokens)}"
                )
            group = tokens[t_path]
            if isinstance(group, ReceptiveTokens):
                group = [group]
            group = list(group)
            if len(group) != len(names):
                raise UserValueError(
                    f"teacher layer {t_path!r} has {len(names)} levels {names} but "
                    f"{len(group)} token sets were given"
                )
            for name, tok in zip(names, group, strict=True):
                if not isinstance(tok, ReceptiveTokens):
                    raise UserTypeError(
                        f"tokens for teacher level {name!r} must be ReceptiveTokens, "
                        f"got {type(tok).__name__}"
                    )
                channels = t_feats[name].shape[1]
                if tok.channels != channels:
                    raise UserValueError(
                        f"tokens for teacher level {name!r} were built for {tok.channels} "
                        f"channels but the level has {channels} "
                        f"(shape {tuple(t_feats[name].shape)})"
                    )
                found.append(tok)
        return found

    def _check_spatial(self, s_name: str, t_name: str, s: Tensor, t: Tensor) -> None:
        if s.shape[0] != t.shape[0]:
            raise UserValueError(
                f"student level {s_name!r} {tuple(s.shape)} and teacher level {t_name!r} "
                f"{tuple(t.shape)} have different batch sizes"
            )
        if s.shape[-2:] != t.shape[-2:] and not self.resize:
            raise UserValueError(
                f"student level {s_name!r} has spatial size {tuple(s.shape[-2:])} (shape "
                f"{tuple(s.shape)}) but teacher level {t_name!r} has {tuple(t.shape[-2:])} "
                f"(shape {tuple(t.shape)}); distil levels of equal size or pass resize=True"
            )

    def train(self, mode: bool = True) -> Distiller:
        """Set the student's (and align modules') mode; the teacher always stays in eval."""
        super().train(mode)
        self.teacher.eval()
        return self

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters the optimizer should update: the student's and the align modules'."""
        return (p for p in self.parameters() if p.requires_grad)

    def student_state_dict(self) -> dict[str, Tensor]:
        """The student's state dict alone, loadable into a fresh instance of the student."""
        return self.student.state_dict()

    def _teacher_features(
        self, images: Any
    ) -> tuple[list[Tensor], dict[str, Tensor], ResizedBatch | None]:
        """The teacher's levels of the paired layers (in order), all its levels, its batch."""
        rec = self._teacher_recorder
        with torch.no_grad(), self._teacher_sizes_like_student():
            rec.run(images)
        feats = [v for path in self.pairs.values() for _, v in flatten_output(path, rec[path])]
        return feats, recorded_levels(rec, self._t_paths), resized_batch(rec)

    def forward(self, images: Any, targets: Any = None) -> Any:
        """Training: ``{student losses..., "loss_maskd"[, "loss_head_kd"]}``; eval: predictions."""
        if not self.training:
            return self.student(images) if targets is None else self.student(images, targets)
        try:
            return self._distill(images, targets)
        finally:  # drop the recorded tensors (and the graph they hold) once the step has them
            self._student_recorder.clear()
            self._teacher_recorder.clear()

    def _distill(self, images: Any, targets: Any) -> dict[str, Tensor]:
        t_feats, t_named, t_batch = self._teacher_features(images)
        s_rec = self._student_recorder
        out = s_rec.run(images, targets)
        s_batch = resized_batch(s_rec)
        s_named = recorded_levels(s_rec, self._s_paths)
        self._check_sizes(s_batch, t_batch)
        if not isinstance(out, dict):
            raise UserTypeError(
                "in training mode the student must return a dict of losses, got "
                f"{type(out).__name__}; wrap segmenters in maskd.SegmentationTask"
            )
        own = ["loss_maskd"] if self.loss is not None else []
        own += ["loss_head_kd"] if self.head_kd is not None else []
        own += [f"loss_{term.name}" for term in self.terms]
        for key in own:
            if key in out:
                raise UserValueError(f"the student's losses already contain a {key!r} entry")
        s_all = [name for names in self._s_levels.values() for name in names]
        if list(s_named) != s_all:
            raise UserRuntimeError(
                f"student levels {list(s_named)} differ from those of the dry run {s_all}"
            )
        losses = dict(out)
        self.last_level_losses = {}
        if self.loss is not None:
            aligned = []
            for s_name, t_name, t, align in zip(
                self.student_levels, self.teacher_levels, t_feats, self.align, strict=True
            ):
                s = s_named[s_name]
                self._check_spatial(s_name, t_name, s, t)
                s = align(s)
                if s.shape[-2:] != t.shape[-2:]:
                    s = F.interpolate(s, size=t.shape[-2:], mode="bilinear", align_corners=False)
                aligned.append(s)
            total, levels = self.loss(aligned, t_feats, return_levels=True)
            self.last_level_losses = {
                f"loss_maskd/{name}": value
                for name, value in zip(self.teacher_levels, levels.values(), strict=True)
            }
            losses["loss_maskd"] = total
        if self.terms:
            ctx = _term_context(s_batch)
            for term in self.terms:
                s_names = self._s_levels[term.student]
                t_names = self._t_levels[term.teacher]
                for s_name, t_name in zip(s_names, t_names, strict=True):
                    self._check_spatial(s_name, t_name, s_named[s_name], t_named[t_name])
                result = term([s_named[n] for n in s_names], [t_named[n] for n in t_names], ctx)
                for key, value in result.items():
                    if key.startswith("loss"):
                        losses[key] = value
                    else:
                        self.last_level_losses[key] = value
        if self.head_kd is not None:
            losses["loss_head_kd"] = self.head_kd.loss(s_rec, self._teacher_recorder)
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
