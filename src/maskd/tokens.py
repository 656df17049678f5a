"""Receptive tokens: learnable vectors whose dot product with a feature map gives soft masks."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from maskd._checks import check_features
from maskd._precision import accum_dtype, autocast_off
from maskd.errors import UserValueError

__all__ = ["ReceptiveTokens"]

# Channels per slice when a channel sum of a product is taken slice by slice: about 2**21
# elements per slice keeps the product temporary small and in cache.
_SLICE_ELEMENTS = 2**21


def _channel_dot(a: Tensor, b: Tensor, dtype: torch.dtype) -> Tensor:
    """``Σ_c a[n,c,p] · b[n,c,p]`` → ``[N, P]`` in ``dtype``, without an ``[N, C, P]`` temporary.

    ``a`` may be expanded (stride 0), as the gradient of a ``.sum()`` is. The channels are
    taken a slice at a time through two reused buffers, so the temporaries stay small and
    are allocated once.
    """
    n, c, p = b.shape
    step = max(1, min(c, _SLICE_ELEMENTS // max(n * p, 1)))
    out = torch.zeros(n, p, dtype=dtype, device=b.device)
    product = torch.empty(n, step, p, dtype=dtype, device=b.device)
    partial = torch.empty(n, p, dtype=dtype, device=b.device)
    for c0 in range(0, c, step):
        width = min(step, c - c0)
        buf = product[:, :width]
        a_c, b_c = a[:, c0 : c0 + width], b[:, c0 : c0 + width]
        if b.dtype != dtype:  # half inputs: multiply in float32, a float16 product can overflow
            a_c, b_c = a_c.to(dtype), b_c.to(dtype)
        torch.mul(a_c, b_c, out=buf)
        out += torch.sum(buf, dim=1, out=partial)
    return out


def _mask_logits(tokens: Tensor, x: Tensor) -> Tensor:
    """``<K_t, x(p)>`` as ``[N, T, P]`` for ``x [N, C, P]``: one batched matmul, no copy of ``x``.

    (``torch.matmul`` of a 2-D by a 3-D tensor copies ``x`` when either requires grad.)
    """
    return torch.bmm(tokens.to(x.dtype).expand(x.shape[0], -1, -1), x)


def _token_grads(
    ctx: Any, grad_logits: Tensor, x: Tensor, tokens: Tensor, grad_x: Tensor | None
) -> tuple[Tensor | None, Tensor | None]:
    """Back through ``logits = K @ x``: adds ``Kᵀ @ grad_logits`` into ``grad_x`` (allocated
    when ``None``) and returns ``(grad_x, grad_K)``, each only when its input needs it."""
    gl = grad_logits.to(x.dtype)
    if ctx.needs_input_grad[0]:
        k_t = tokens.to(x.dtype).t().expand(x.shape[0], -1, -1)  # [N, C, T]
        grad_x = torch.bmm(k_t, gl) if grad_x is None else grad_x.baddbmm_(k_t, gl)
    else:
        grad_x = None
    grad_k = None
    if ctx.needs_input_grad[1]:
        grad_k = torch.bmm(gl, x.transpose(1, 2)).sum(dim=0).to(tokens.dtype)  # [T, C]
    return grad_x, grad_k


class _TokenMasks(torch.autograd.Function):
    """``sigmoid(K @ x)``: ``x [N, C, P]``, ``K [T, C]`` → masks ``[N, T, P]`` in x's dtype."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, tokens: Tensor) -> Tensor:
        masks = _mask_logits(tokens, x).sigmoid_()
        ctx.save_for_backward(x, tokens, masks)
        return masks

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_masks: Tensor) -> tuple[Tensor | None, Tensor | None]:
        x, tokens, masks = ctx.saved_tensors
        grad_logits = grad_masks * masks * (1.0 - masks)
        return _token_grads(ctx, grad_logits, x, tokens, None)


class _MaskedFeatures(torch.autograd.Function):
    """``(Σ_t w_t m_t ⊙ x, m)`` with ``m = sigmoid(K @ x)``, fused forward and backward.

    Inputs: ``x [N, C, P]``, ``K [T, C]``, optional ``w [N, T]``. The only feature-sized
    buffers are the output and, in backward, the gradient of ``x`` (the token term is
    added into it in place); the channel sum the backward needs is taken slice by slice.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, tokens: Tensor, weights: Tensor | None) -> Any:
        masks = _mask_logits(tokens, x).sigmoid_()  # [N, T, P]
        if weights is None:
            combined = masks.sum(dim=1, keepdim=True)
        else:
            combined = torch.bmm(weights.to(masks.dtype).unsqueeze(1), masks)  # [N, 1, P]
        ctx.save_for_backward(x, tokens, weights, masks, combined)
        return combined * x, masks

    @staticmethod
    @once_differentiable
    def backward(
        ctx: Any, grad_out: Tensor | None, grad_masks: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x, tokens, weights, masks, combined = ctx.saved_tensors
        dtype = accum_dtype(x)
        grad_w = None
        grad_logits = None if grad_masks is None else grad_masks.to(dtype)
        grad_x = None
        if grad_out is not None:
            grad_comb = _channel_dot(grad_out, x, dtype).unsqueeze(1)  # [N, 1, P]
            via_comb = grad_comb if weights is None else weights.to(dtype).unsqueeze(2) * grad_comb
            grad_logits = via_comb if grad_logits is None else grad_logits + via_comb
            if ctx.needs_input_grad[2]:
                grad_w = (masks.to(dtype) * grad_comb).sum(dim=2).to(weights.dtype)  # [N, T]
            if ctx.needs_input_grad[0]:
                grad_x = combined * grad_out
        if grad_logits is None:
            return grad_x, None, grad_w
        m = masks.to(dtype)
        grad_x, grad_k = _token_grads(ctx, grad_logits * m * (1.0 - m), x, tokens, grad_x)
        return grad_x, grad_k, grad_w


class ReceptiveTokens(nn.Module):
    """A set of ``T`` receptive tokens for one feature map with ``C`` channels.

    Token ``t`` turns a feature ``x`` into the soft mask ``m_t(p) = sigmoid(<K_t, x(p)>)``.
    With ``weighted=True`` a small head (conv3x3 → global average pool → conv1x1 → softmax)
    predicts per-sample token weights ``w [N, T]`` from the same feature.

    Parameter names follow the released MasKD checkpoints (``mask_token``, ``prob.0``,
    ``prob.2``) so their state dicts load as they are.

    Args:
        channels: ``C``, channels of the feature map the tokens read.
        num_tokens: ``T``, number of tokens (masks) to learn.
        weighted: add the token-weighting head.
    """

    def __init__(self, channels: int, num_tokens: int = 6, weighted: bool = False) -> None:
        super().__init__()
        if not isinstance(channels, int) or isinstance(channels, bool) or channels < 1:
            raise UserValueError(f"channels must be a positive int, got {channels!r}")
        if not isinstance(num_tokens, int) or isinstance(num_tokens, bool) or num_tokens < 1:
            raise UserValueError(f"num_tokens must be a positive int, got {num_tokens!r}")
        self.channels = channels
        self.num_tokens = num_tokens
        self.weighted = bool(weighted)
        self.mask_token = nn.Parameter(torch.empty(num_tokens, channels))
        self.prob: nn.Sequential | None = None
        if self.weighted:
            self.prob = nn.Sequential(
                nn.Conv2d(channels, channels, kernel_size=3, padding=1),
                nn.AdaptiveAvgPool2d(1),
                nn.Conv2d(channels, num_tokens, kernel_size=1),
            )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise as the authors: tokens ~ N(0, 0.01²); convs ~ N(0, 2/fan_out), bias 0."""
        nn.init.normal_(self.mask_token, mean=0.0, std=0.01)
        if self.prob is not None:
            for m in self.prob.modules():
                if isinstance(m, nn.Conv2d):
                    fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                    nn.init.normal_(m.weight, mean=0.0, std=math.sqrt(2.0 / fan_out))
                    nn.init.zeros_(m.bias)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, num_tokens={self.num_tokens}, weighted={self.weighted}"

    def _check(self, x: Tensor, name: str = "x") -> None:
        check_features(x, name)
        if x.shape[1] != self.channels:
            raise UserValueError(
                f"{name} has {x.shape[1]} channels but these tokens were built for "
                f"{self.channels} (x shape {tuple(x.shape)})"
            )

    def forward(self, x: Tensor) -> Tensor:
        """Soft masks of every token.

        Args:
            x: feature map ``[N, C, H, W]``.

        Returns:
            masks ``[N, T, H, W]`` in (0, 1).
        """
        self._check(x)
        n, _, h, w = x.shape
        with autocast_off(x):
            masks = _TokenMasks.apply(x.flatten(2), self.mask_token)
        return masks.view(n, self.num_tokens, h, w)

    def without_head(self) -> ReceptiveTokens:
        """A copy with the same tokens and no weighting head: the same masks, each token
        weighted equally (stage 2: ``1 / T``; stage 1: ``w_t ≡ 1``)."""
        bare = ReceptiveTokens(self.channels, self.num_tokens, weighted=False)
        bare.to(self.mask_token)  # device and dtype
        bare.mask_token.data.copy_(self.mask_token.detach())
        bare.mask_token.requires_grad_(self.mask_token.requires_grad)
        return bare

    def token_weights(self, x: Tensor) -> Tensor | None:
        """Per-sample token weights ``[N, T]`` (softmax over T), or ``None`` when unweighted."""
        if self.prob is None:
            return None
        self._check(x)
        return self.prob(x).flatten(1).softmax(dim=1)

    def mask_features(
        self, x: Tensor, return_masks: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Masked feature ``Σ_t w_t · m_t ⊙ x`` (``w_t ≡ 1`` without the head), ``[N, C, H, W]``.

        One fused kernel: the masks are summed over tokens first (``[N, 1, H, W]``) and only
        then multiplied into ``x``, so no ``[N, T, C, H, W]`` tensor is built in forward or
        backward, and the backward allocates nothing feature-sized besides ``x``'s gradient.

        Args:
            x: feature map ``[N, C, H, W]``.
            return_masks: also return the masks ``[N, T, H, W]`` (stage 1 needs them for the
                Dice loss); gradients through both outputs are combined in one backward.

        Returns:
            the masked feature, or ``(masked feature, masks)`` with ``return_masks=True``.
        """
        self._check(x)
        weights = self.token_weights(x)
        n, c, h, w = x.shape
        with autocast_off(x):
            out, masks = _MaskedFeatures.apply(x.flatten(2), self.mask_token, weights)
        out = out.view(n, c, h, w)
        if return_masks:
            return out, masks.view(n, self.num_tokens, h, w)
        return out
