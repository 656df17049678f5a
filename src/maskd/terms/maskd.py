"""MasKD (Huang et al., "Masked Distillation with Receptive Tokens", ICLR 2023), stage 2.

Frozen receptive tokens learned on the teacher (stage 1) give, per teacher level ``[N, C, H,
W]``, masks ``m_k`` (``k = 1..T``) and token weights ``w[n, k]``. The aligned student level
``s`` imitates the teacher level ``t`` inside each mask:

    L[n,k,c] = Σ_p m_k(p)² (s_c(p) − t_c(p))² / (Σ_p m_k(p) + eps),
    L_level  = mean_n Σ_k w[n,k] · mean_c L[n,k,c]     (unweighted tokens: mean over n, k, c),
    loss     = weight · Σ_levels level_weight_l · L_level.

After ``custom_mask_warmup`` optimizer steps each mask is multiplied by the mask of the
aligned student level (same tokens, no gradient), as the authors' mmrazor code does. The
kernel is :class:`~maskd.losses.MasKDLoss`; this term adds the layers, the connectors and the
token source.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Literal

from torch import Tensor

from maskd._checks import check_number
from maskd.errors import UserTypeError, UserValueError
from maskd.losses import MasKDLoss
from maskd.terms.base import FeatureTerm, TermContext
from maskd.tokens import ReceptiveTokens

__all__ = ["MaskdTerm"]

Tokens = ReceptiveTokens | Sequence[ReceptiveTokens] | Mapping[str, Sequence[ReceptiveTokens]]


class MaskdTerm(FeatureTerm):
    """Masked distillation of one student layer from one teacher layer with frozen tokens.

    Args:
        student: the student layer path.
        teacher: the teacher layer path.
        tokens: one :class:`~maskd.tokens.ReceptiveTokens` per teacher level (a list), or
            ``{teacher layer: [ReceptiveTokens per level]}`` as
            :meth:`~maskd.learner.TokenLearner.tokens` and :func:`~maskd.token_io.load_tokens`
            give, from which the term takes those of its source layer. They are copied and
            frozen; the caller's are untouched.
        tokens_from: the source layer in a ``tokens`` mapping when it is not ``teacher``,
            e.g. the main logits' tokens for the auxiliary head's logits, as the authors do in
            segmentation.
        level_weights: a multiplier of each level's loss: one number for every level, or a
            list with one per distilled level (default 1).
        custom_mask_warmup: optimizer steps before the student-side mask is multiplied in
            (``None``: never).
        eps: added to each mask's area (authors: 1e-5 for segmentation, 0 for detection).
        token_weights: ``"head"`` (the default, as the authors): weighted tokens use their
            head's per-sample weights; ``"equal"``: every token weighs ``1 / T``, the head
            unused (where stage 1's head puts all its weight on one token, e.g. one that
            covers every position, and the other masks would count for nothing).
        weight: the MasKD loss weight (authors: 1 Faster R-CNN, 7 RetinaNet, 10 FCOS,
            0.5 segmentation).
        align: 1x1 conv connectors (the default, as the authors even for equal channels),
            ``False`` (identity) or ``"auto"``.
        resize, levels, name: :class:`~maskd.terms.base.FeatureTerm`'s (with ``levels``, the
            token sets of those levels are used; ``tokens`` still holds one per level).
    """

    kind = "maskd"
    default_align = True

    def __init__(
        self,
        student: str,
        teacher: str,
        tokens: Tokens,
        *,
        tokens_from: str | None = None,
        level_weights: float | Sequence[float] | None = None,
        custom_mask_warmup: int | None = None,
        eps: float = 0.0,
        token_weights: Literal["head", "equal"] = "head",
        **kwargs: object,
    ) -> None:
        super().__init__(student, teacher, **kwargs)  # type: ignore[arg-type]
        if tokens_from is not None and not isinstance(tokens_from, str):
            raise UserTypeError(
                f"maskd term: tokens_from must be a teacher layer path, got {tokens_from!r}"
            )
        self.source = teacher if tokens_from is None else tokens_from
        self._given = _pick_tokens(tokens, tokens_from, self.source)
        if level_weights is not None and not isinstance(level_weights, Sequence):
            check_number(level_weights, "maskd term: level_weights", low=0)
        elif isinstance(level_weights, str):
            raise UserTypeError(
                f"maskd term: level_weights must be a number or a list, got {level_weights!r}"
            )
        if custom_mask_warmup is not None:
            check_number(custom_mask_warmup, "maskd term: custom_mask_warmup", low=0, integer=True)
        check_number(eps, "maskd term: eps", low=0)
        if token_weights not in ("head", "equal"):
            raise UserValueError(
                f"maskd term: token_weights must be 'head' or 'equal', got {token_weights!r}"
            )
        self.token_weights = token_weights
        self.level_weights = level_weights
        self.custom_mask_warmup = custom_mask_warmup
        self.eps = float(eps)
        self.loss: MasKDLoss | None = None

    def extra_repr(self) -> str:
        source = "" if self.source == self.teacher else f", tokens_from={self.source}"
        equal = ", token_weights=equal" if self.token_weights == "equal" else ""
        return f"{super().extra_repr()}{source}{equal}"

    def build(
        self, student: Sequence[Tensor], teacher: Sequence[Tensor], levels: list[str]
    ) -> None:
        super().build(student, teacher, levels)
        group, every = self._given, self.teacher_levels or levels
        if len(group) != len(every):
            source = "" if self.source == self.teacher else f" (tokens of {self.source!r})"
            raise UserValueError(
                f"maskd term: teacher layer {self.teacher!r} has {len(every)} levels {every} "
                f"but {len(group)} token sets were given{source}"
            )
        if len(levels) != len(every):  # distilling some levels: their token sets
            group = [group[i] for i in self.level_index]
        for name, tok, t in zip(levels, group, teacher, strict=True):
            if tok.channels != t.shape[1]:
                raise UserValueError(
                    f"maskd term: tokens for teacher level {name!r} were built for "
                    f"{tok.channels} channels but the level has {t.shape[1]} "
                    f"(shape {tuple(t.shape)})"
                )
        weights = self.level_weights
        if weights is not None and not isinstance(weights, Sequence):
            weights = [weights] * len(levels)
        if self.token_weights == "equal":
            group = [tok.without_head() for tok in group]
        self.loss = MasKDLoss(
            [copy.deepcopy(tok).to(t.device) for tok, t in zip(group, teacher, strict=True)],
            loss_weight=self.weight,
            custom_mask_warmup=self.custom_mask_warmup,
            eps=self.eps,
            level_weights=weights,
        )
        self._given = []  # the caller's tokens are not kept

    def set_step(self, step: int) -> None:
        if self.loss is not None:
            self.loss.step = int(step)

    def level_loss(self, s: Tensor, t: Tensor, index: int, ctx: TermContext) -> Tensor:
        raise NotImplementedError("MasKD's levels are computed together, in compare()")

    def compare(
        self, student: Sequence[Tensor], teacher: Sequence[Tensor], ctx: TermContext
    ) -> dict[str, Tensor]:
        """``{"loss_<name>": the MasKD loss, "<name>/<level>": unweighted level loss}``."""
        assert self.loss is not None, "the term is not built (Distiller builds it)"
        aligned = [
            self.aligned(s, i, t.shape[-2:])
            for i, (s, t) in enumerate(zip(student, teacher, strict=True))
        ]
        total, levels = self.loss(aligned, teacher, return_levels=True)
        out = {f"loss_{self.name}": total}
        for name, value in zip(self.levels, levels.values(), strict=True):
            out[f"{self.name}/{name}"] = value
        return out


def _pick_tokens(tokens: object, tokens_from: str | None, source: str) -> list[ReceptiveTokens]:
    """The token sets of the source layer, in level order (checked for type only)."""
    if isinstance(tokens, ReceptiveTokens):
        group: object = [tokens]
    elif isinstance(tokens, Mapping):
        if source not in tokens:
            raise UserValueError(
                f"maskd term: no tokens for teacher layer {source!r}; tokens cover {list(tokens)}"
            )
        group = tokens[source]
        group = [group] if isinstance(group, ReceptiveTokens) else group
    elif isinstance(tokens, Sequence) and not isinstance(tokens, str):
        if tokens_from is not None:
            raise UserValueError(
                "maskd term: tokens_from picks a layer of a tokens mapping {teacher layer: "
                "[ReceptiveTokens per level]}, but the tokens are a list"
            )
        group = tokens
    else:
        raise UserTypeError(
            "maskd term: tokens must be ReceptiveTokens per level or a mapping {teacher layer: "
            "[ReceptiveTokens per level]} (TokenLearner.tokens(), maskd.load_tokens), got "
            f"{type(tokens).__name__}"
        )
    if isinstance(group, str) or not isinstance(group, Sequence):
        raise UserTypeError(
            f"maskd term: tokens of teacher layer {source!r} must be a list of ReceptiveTokens, "
            f"got {type(group).__name__}"
        )
    for i, tok in enumerate(group):
        if not isinstance(tok, ReceptiveTokens):
            raise UserTypeError(
                f"maskd term: tokens of teacher layer {source!r}, level {i}, must be "
                f"ReceptiveTokens, got {type(tok).__name__}"
            )
    return list(group)
