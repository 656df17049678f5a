"""MasKD losses: Dice diversity of token masks and the masked distillation loss.

The stage-2 loss of METHOD.md,

    L[n,k,c] = Σ_p (m_k(p)·s_c(p) − m_k(p)·t_c(p))² / Σ_p m_k(p),

is averaged (or token-weighted) over k and c with weights that do not depend on the
channel. It is therefore one per-pixel weighted squared error,

    loss = Σ_{n,p} a[n,p] · ‖s(p) − t(p)‖²,   a[n,p] = Σ_k w'[n,k] · m_k(p)² / Σ_q m_k(q),

with ``w' = w / (N·C)`` (weighted) or ``1 / (N·T·C)`` (unweighted). ``a`` costs
``[N, T, H·W]``; the error term is one pass over the features, like plain MSE. A
hand-written backward turns the one feature-sized buffer it needs, ``s − t``, into the
gradient in place, so forward+backward allocate no more than MSE does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from maskd._checks import check_features, check_number, check_same_shape
from maskd._precision import accum_dtype, autocast_off
from maskd.errors import UserTypeError, UserValueError
from maskd.tokens import ReceptiveTokens

__all__ = ["MasKDLoss", "dice_diversity", "masked_distillation_loss"]

_DICE_EPS = 1e-12


def _check_masks(masks: object, name: str = "masks") -> Tensor:
    check_features(masks, name)
    assert isinstance(masks, Tensor)
    return masks


def dice_diversity(masks: Tensor) -> Tensor:
    """Mean Dice coefficient between every ordered pair of distinct token masks.

    ``D(i, j) = 2 Σ_p m_i m_j / (Σ_p m_i² + ε + Σ_p m_j² + ε)``, averaged over the
    ``T·(T−1)`` pairs with ``i ≠ j`` and over the batch. Minimising it pushes tokens apart.

    Args:
        masks: ``[N, T, H, W]`` soft masks.

    Returns:
        scalar tensor (float32, or float64 for float64 masks); exactly 0 when ``T = 1``.
    """
    masks = _check_masks(masks)
    n, t = masks.shape[:2]
    with autocast_off(masks):
        m = masks.flatten(2).to(accum_dtype(masks))  # [N, T, P]
        if t == 1:
            return m.sum() * 0.0
        inter = torch.bmm(m, m.transpose(1, 2))  # [N, T, T]
        sq = torch.diagonal(inter, dim1=1, dim2=2) + _DICE_EPS  # [N, T]
        dice = 2.0 * inter / (sq.unsqueeze(2) + sq.unsqueeze(1))
        off_diag = ~torch.eye(t, dtype=torch.bool, device=masks.device)
        return dice[:, off_diag].sum() / (n * t * (t - 1))


class _PixelWeightedSquaredError(torch.autograd.Function):
    """``Σ_{n,p} a[n,p] · Σ_c (s[n,c,p] − t[n,c,p])²`` with gradients to ``s`` and ``a``.

    ``t`` is treated as a constant (the teacher never receives gradient).
    Inputs: ``s``, ``t`` ``[N, C, P]``, ``a`` ``[N, P]`` in the accumulation dtype.

    The difference ``s − t`` is the only feature-sized buffer: it is kept from forward to
    backward and turned into the gradient in place. A second backward through a retained
    graph recomputes it.
    """

    @staticmethod
    def forward(ctx: Any, s: Tensor, t: Tensor, a: Tensor) -> Tensor:
        diff = torch.sub(s, t)
        sq = torch.linalg.vector_norm(diff, dim=1, dtype=a.dtype).square_()  # [N, P]
        ctx.save_for_backward(s, t, a, sq if ctx.needs_input_grad[2] else None)
        ctx.diff = diff if ctx.needs_input_grad[0] else None
        return (a * sq).sum()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, Tensor | None]:
        s, t, a, sq = ctx.saved_tensors
        grad_s = grad_a = None
        if ctx.needs_input_grad[0]:
            diff, ctx.diff = ctx.diff, None
            if diff is None:  # graph retained and differentiated again
                diff = torch.sub(s, t)
            grad_s = diff.mul_(((2.0 * grad) * a).unsqueeze(1)).to(s.dtype)
        if ctx.needs_input_grad[2]:
            grad_a = grad * sq
        return grad_s, None, grad_a


def _check_pair(
    student: object, teacher: object, masks: object, weights: object
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    check_features(student, "student")
    check_features(teacher, "teacher")
    assert isinstance(student, Tensor) and isinstance(teacher, Tensor)
    check_same_shape(student, teacher, "student", "teacher")
    m = _check_masks(masks)
    n, _, h, w = student.shape
    if m.shape[0] != n or m.shape[2:] != student.shape[2:]:
        raise UserValueError(
            f"masks must be [N, T, H, W] = [{n}, T, {h}, {w}] to match the features, "
            f"got {tuple(m.shape)}"
        )
    if weights is not None:
        if not isinstance(weights, Tensor):
            raise UserTypeError(
                f"weights must be a torch.Tensor [N, T], got {type(weights).__name__}"
            )
        if weights.shape != m.shape[:2]:
            raise UserValueError(
                f"weights must be [N, T] = {list(m.shape[:2])} to match masks "
                f"{tuple(m.shape)}, got {tuple(weights.shape)}"
            )
    return student, teacher, m, weights


def pixel_weights(
    masks: Tensor, channels: int, weights: Tensor | None = None, eps: float = 0.0
) -> Tensor:
    """Per-pixel loss weights ``a [N, H·W]`` equivalent to the masked distillation loss.

    Args:
        masks: ``[N, T, H, W]`` token masks.
        channels: ``C`` of the distilled features (the loss averages over it).
        weights: optional token weights ``[N, T]``.
        eps: added to each mask's area ``Σ_p m_k(p)``.
    """
    n, t = masks.shape[:2]
    m = masks.flatten(2).to(accum_dtype(masks))  # [N, T, P]
    # A mask that underflowed to zero everywhere contributes 0 (0/0 := 0), not NaN; any
    # area above float32's smallest normal number is used as it is.
    area = (m.sum(dim=2) + eps).clamp_min(torch.finfo(torch.float32).tiny)  # [N, T]
    if weights is None:
        coef = 1.0 / (area * (n * t * channels))
    else:
        coef = weights.to(m.dtype) / (area * (n * channels))
    return torch.einsum("ntp,nt->np", m.square(), coef)


def masked_distillation_loss(
    student: Tensor,
    teacher: Tensor,
    masks: Tensor,
    weights: Tensor | None = None,
    eps: float = 0.0,
) -> Tensor:
    """MasKD's stage-2 loss for one feature map (METHOD.md).

    ``L[n,k,c] = Σ_p m_k(p)² (s_c(p) − t_c(p))² / (Σ_p m_k(p) + eps)``; with ``weights``
    the loss is ``mean_n Σ_k w[n,k] · mean_c L[n,k,c]``, without it ``mean_{n,k,c} L``.
    Never builds an ``[N, T, C, H, W]`` tensor, accumulates in float32 under autocast,
    and sends no gradient into ``teacher``.

    Args:
        student: ``[N, C, H, W]`` student feature (already aligned to the teacher's channels).
        teacher: ``[N, C, H, W]`` teacher feature.
        masks: ``[N, T, H, W]`` token masks, usually computed from ``teacher``.
        weights: optional ``[N, T]`` token weights.
        eps: added to each mask's area (the authors use 1e-5 for segmentation, 0 for detection).

    Returns:
        scalar loss (float32, or float64 for float64 inputs).
    """
    student, teacher, masks, weights = _check_pair(student, teacher, masks, weights)
    with autocast_off(student):
        a = pixel_weights(masks, student.shape[1], weights, eps)
        return _PixelWeightedSquaredError.apply(
            student.flatten(2), teacher.detach().flatten(2), a.to(accum_dtype(student))
        )


class MasKDLoss(nn.Module):
    """Masked distillation over several feature maps with frozen receptive tokens.

    Args:
        tokens: one :class:`ReceptiveTokens` per distilled feature map, as a sequence
            (features then come as sequences in the same order) or a mapping (features
            come as dicts with the same keys).
        loss_weight: multiplies the sum over feature maps.
        level_weights: optional per-feature-map multipliers (same order or keys as
            ``tokens``; default 1 each), e.g. 0.4 for an auxiliary head's logits.
        custom_mask_warmup: after this many training-mode calls, each teacher mask is
            multiplied by the mask of the student's feature (same tokens, no gradient).
            ``None`` disables it.
        eps: added to each mask's area.

    The tokens never train here: their parameters have ``requires_grad=False`` and masks
    are computed under ``no_grad``. The number of training-mode calls is kept in
    ``state_dict()``, so a resumed run switches to custom masks at the same step.
    """

    def __init__(
        self,
        tokens: Sequence[ReceptiveTokens] | Mapping[str, ReceptiveTokens],
        loss_weight: float = 1.0,
        custom_mask_warmup: int | None = None,
        eps: float = 0.0,
        level_weights: Sequence[float] | Mapping[str, float] | None = None,
    ) -> None:
        super().__init__()
        if isinstance(tokens, Mapping):
            names = [str(k) for k in tokens]
            mods = list(tokens.values())
            self.keyed = True
        elif isinstance(tokens, Sequence) and not isinstance(tokens, str):
            names = [str(i) for i in range(len(tokens))]
            mods = list(tokens)
            self.keyed = False
        else:
            raise UserTypeError(
                f"tokens must be a sequence or mapping of ReceptiveTokens, got {type(tokens).__name__}"
            )
        if not mods:
            raise UserValueError("tokens is empty: MasKDLoss needs at least one ReceptiveTokens")
        for name, mod in zip(names, mods, strict=True):
            if not isinstance(mod, ReceptiveTokens):
                raise UserTypeError(
                    f"tokens[{name!r}] must be ReceptiveTokens, got {type(mod).__name__}"
                )
        if custom_mask_warmup is not None and (
            not isinstance(custom_mask_warmup, int) or custom_mask_warmup < 0
        ):
            raise UserValueError(
                f"custom_mask_warmup must be None or a non-negative int, got {custom_mask_warmup!r}"
            )
        self.names = names
        self.level_weights = self._check_level_weights(level_weights, names)
        self.tokens = nn.ModuleList(mods)
        self.tokens.requires_grad_(False)
        self.loss_weight = float(loss_weight)
        self.custom_mask_warmup = custom_mask_warmup
        self.eps = float(eps)
        self.step = 0

    @staticmethod
    def _check_level_weights(weights: object, names: list[str]) -> list[float]:
        if weights is None:
            return [1.0] * len(names)
        if isinstance(weights, Mapping):
            unknown = sorted(str(k) for k in weights if str(k) not in names)
            if unknown:
                raise UserValueError(
                    f"level_weights names unknown levels {unknown}; levels: {names}"
                )
            by_name = {str(k): v for k, v in weights.items()}
            values = [by_name.get(n, 1.0) for n in names]
        elif isinstance(weights, Sequence) and not isinstance(weights, str):
            values = list(weights)
            if len(values) != len(names):
                raise UserValueError(
                    f"level_weights has {len(values)} entries but there are {len(names)} levels"
                )
        else:
            raise UserTypeError(
                f"level_weights must be a sequence or mapping of numbers, got {type(weights).__name__}"
            )
        for name, v in zip(names, values, strict=True):
            check_number(v, f"level_weights[{name!r}]", low=0)
        return [float(v) for v in values]

    def get_extra_state(self) -> dict[str, int]:
        return {"step": self.step}

    def set_extra_state(self, state: dict[str, int]) -> None:
        self.step = int(state["step"])

    def extra_repr(self) -> str:
        return (
            f"levels={self.names}, loss_weight={self.loss_weight}, "
            f"level_weights={self.level_weights}, "
            f"custom_mask_warmup={self.custom_mask_warmup}, eps={self.eps}"
        )

    def _as_list(self, feats: object, name: str) -> list[Tensor]:
        if self.keyed:
            if not isinstance(feats, Mapping):
                raise UserTypeError(
                    f"{name} must be a dict with keys {self.names}, got {type(feats).__name__}"
                )
            keys = [str(k) for k in feats]
            if sorted(keys) != sorted(self.names):
                raise UserValueError(f"{name} has keys {keys}, expected {self.names}")
            by_name = {str(k): v for k, v in feats.items()}
            return [by_name[k] for k in self.names]
        if isinstance(feats, Mapping) or not isinstance(feats, Sequence):
            raise UserTypeError(
                f"{name} must be a sequence of {len(self.names)} tensors, got {type(feats).__name__}"
            )
        if len(feats) != len(self.names):
            raise UserValueError(
                f"{name} has {len(feats)} feature maps, expected {len(self.names)}"
            )
        return list(feats)

    @property
    def custom_mask_active(self) -> bool:
        """Whether the next call multiplies in the student-side mask."""
        return self.custom_mask_warmup is not None and self.step >= self.custom_mask_warmup

    def forward(
        self,
        student_feats: Sequence[Tensor] | Mapping[str, Tensor],
        teacher_feats: Sequence[Tensor] | Mapping[str, Tensor],
        return_levels: bool = False,
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """Weighted sum over feature maps of :func:`masked_distillation_loss`.

        Args:
            student_feats: ``[N, C_l, H_l, W_l]`` per level, aligned to the teacher's channels.
            teacher_feats: ``[N, C_l, H_l, W_l]`` per level.
            return_levels: also return ``{level name: detached loss}``, before the level
                and loss weights.
        """
        students = self._as_list(student_feats, "student_feats")
        teachers = self._as_list(teacher_feats, "teacher_feats")
        custom = self.custom_mask_active
        total: Tensor | None = None
        levels: dict[str, Tensor] = {}
        for name, tok, lw, s, t in zip(
            self.names, self.tokens, self.level_weights, students, teachers, strict=True
        ):
            check_features(s, f"student_feats[{name!r}]")
            check_features(t, f"teacher_feats[{name!r}]")
            check_same_shape(s, t, f"student_feats[{name!r}]", f"teacher_feats[{name!r}]")
            if t.shape[1] != tok.channels:
                raise UserValueError(
                    f"level {name!r}: features have {t.shape[1]} channels but its tokens were "
                    f"built for {tok.channels}"
                )
            with torch.no_grad():
                t = t.detach()
                masks = tok(t)
                weights = tok.token_weights(t)
                if custom:
                    masks = masks * tok(s.detach())
            loss = masked_distillation_loss(s, t, masks, weights, self.eps)
            levels[name] = loss.detach()
            loss = loss * lw
            total = loss if total is None else total + loss
        assert total is not None
        if self.training:
            self.step += 1
        total = total * self.loss_weight
        return (total, levels) if return_levels else total
