"""CWD (Shu et al., "Channel-wise Knowledge Distillation for Dense Prediction", ICCV 2021).

Each channel of a ``[N, C, H, W]`` map becomes a distribution over its ``H·W`` positions,
``p_c = softmax(x_c / τ)``; the loss is ``τ² · KL(p^T_c ‖ p^S_c)`` averaged over the
``N·C`` channels:

    L = τ² / (N·C) · Σ_{n,c} Σ_p p^T_{n,c}(p) · (log p^T_{n,c}(p) − log p^S_{n,c}(p)).
"""

from __future__ import annotations

import torch
from torch import Tensor

from maskd._precision import accum_dtype
from maskd.terms.base import TemperatureTerm, TermContext

__all__ = ["CWDTerm", "channel_wise_divergence"]


def channel_wise_divergence(s: Tensor, t: Tensor, tau: float = 1.0) -> Tensor:
    """CWD of student ``s`` from teacher ``t``, both ``[N, C, H, W]``; a float32 scalar."""
    n, c = t.shape[:2]
    log_ps = torch.log_softmax(s.to(accum_dtype(s)).flatten(2) / tau, dim=2)
    log_pt = torch.log_softmax(t.to(accum_dtype(s)).flatten(2) / tau, dim=2)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum()
    return kl * (tau * tau) / (n * c)


class CWDTerm(TemperatureTerm):
    """Channel-wise distillation on aligned features.

    Args:
        tau: softmax temperature τ (mmrazor's CWD configs: 1, with loss weight 10 on FPN
            features and 5 on segmentation logits).
        **kwargs: :class:`~maskd.terms.base.FeatureTerm`'s.
    """

    kind = "cwd"

    def level_loss(self, s: Tensor, t: Tensor, index: int, ctx: TermContext) -> Tensor:
        return channel_wise_divergence(s, t, self.tau)
