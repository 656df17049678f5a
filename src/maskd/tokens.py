"""Receptive tokens: learnable vectors whose dot product with a feature map gives soft masks."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from maskd._checks import check_features

__all__ = ["ReceptiveTokens"]


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
            raise ValueError(f"channels must be a positive int, got {channels!r}")
        if not isinstance(num_tokens, int) or isinstance(num_tokens, bool) or num_tokens < 1:
            raise ValueError(f"num_tokens must be a positive int, got {num_tokens!r}")
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
            raise ValueError(
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
        logits = torch.einsum("tc,nchw->nthw", self.mask_token.to(x.dtype), x)
        return logits.sigmoid()

    def token_weights(self, x: Tensor) -> Tensor | None:
        """Per-sample token weights ``[N, T]`` (softmax over T), or ``None`` when unweighted."""
        if self.prob is None:
            return None
        self._check(x)
        return self.prob(x).flatten(1).softmax(dim=1)

    def mask_features(self, x: Tensor, masks: Tensor | None = None) -> Tensor:
        """Masked feature ``Σ_t w_t · m_t ⊙ x`` (``w_t ≡ 1`` without the head), ``[N, C, H, W]``.

        The token sum is taken over the masks first (``[N, 1, H, W]``) and only then
        multiplied into ``x``, so no ``[N, T, C, H, W]`` tensor is ever built.

        Args:
            x: feature map ``[N, C, H, W]``.
            masks: ``self(x)``, ``[N, T, H, W]``, when the caller already has it (stage 1
                also needs the masks for the Dice loss); computed here otherwise.
        """
        if masks is None:
            masks = self(x)
        else:
            self._check(x)
            expected = (x.shape[0], self.num_tokens, *x.shape[2:])
            if not isinstance(masks, Tensor) or tuple(masks.shape) != expected:
                found = tuple(masks.shape) if isinstance(masks, Tensor) else type(masks).__name__
                raise ValueError(f"masks must be [N, T, H, W] = {list(expected)}, got {found}")
        weights = self.token_weights(x)
        if weights is None:
            combined = masks.sum(dim=1, keepdim=True)
        else:
            combined = torch.einsum("nthw,nt->nhw", masks, weights.to(masks.dtype)).unsqueeze(1)
        return combined * x
