"""Precision helpers shared by the core kernels: sums accumulate in float32 (or float64)."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import Tensor

__all__ = ["accum_dtype", "autocast_off"]


def autocast_off(x: Tensor) -> AbstractContextManager[Any]:
    """Autocast off on ``x``'s device, so that each op runs in the dtype it is given."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.autocast(x.device.type, enabled=False)
    return nullcontext()


def accum_dtype(x: Tensor) -> torch.dtype:
    """float64 for float64 tensors, float32 otherwise (half and bfloat16 included)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32
