"""Pixel-wise logits KD for segmentation (Hinton et al. 2015, per pixel as in CIRKD).

At every pixel, the student's class distribution follows the teacher's, softened by a
temperature τ: ``L = τ² / (N·H·W) · Σ_{n,p} KL(softmax(t_p / τ) ‖ softmax(s_p / τ))``,
with the softmax over the ``C`` classes of ``[N, C, H, W]`` logits.
"""

from __future__ import annotations

import torch
from torch import Tensor

from maskd._precision import accum_dtype
from maskd.terms.base import TemperatureTerm, TermContext

__all__ = ["LogitsKDTerm", "pixel_kd_loss"]


def pixel_kd_loss(s: Tensor, t: Tensor, tau: float = 1.0) -> Tensor:
    """Per-pixel KL of student logits ``s`` from teacher logits ``t`` (``[N, C, H, W]``)."""
    n, _, h, w = t.shape
    log_ps = torch.log_softmax(s.to(accum_dtype(s)) / tau, dim=1)
    log_pt = torch.log_softmax(t.to(accum_dtype(s)) / tau, dim=1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum()
    return kl * (tau * tau) / (n * h * w)


class LogitsKDTerm(TemperatureTerm):
    """Logits KD on raw (unaligned by default) segmentation logits.

    Args:
        tau: temperature τ (CIRKD's default: 1).
        **kwargs: :class:`~maskd.terms.base.FeatureTerm`'s; ``align`` defaults to false.
    """

    kind = "logits_kd"
    default_align = False

    def level_loss(self, s: Tensor, t: Tensor, index: int, ctx: TermContext) -> Tensor:
        return pixel_kd_loss(s, t, self.tau)
