"""FitNet (Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015).

The aligned student feature regresses the teacher's at every position:
``L = mean_{n,c,h,w} (align(s) − t)²`` per level.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from maskd._precision import accum_dtype
from maskd.terms.base import FeatureTerm, TermContext

__all__ = ["FitNetTerm", "fitnet_loss"]


def fitnet_loss(s: Tensor, t: Tensor) -> Tensor:
    """Mean squared error of ``[N, C, H, W]`` features, in float32 (float64 for float64)."""
    dtype = accum_dtype(s)
    return F.mse_loss(s.to(dtype), t.to(dtype))


class FitNetTerm(FeatureTerm):
    """FitNet feature imitation: ``weight · Σ_levels mean((align(s) − t)²)``."""

    kind = "fitnet"

    def level_loss(self, s: Tensor, t: Tensor, index: int, ctx: TermContext) -> Tensor:
        return fitnet_loss(s, t)
