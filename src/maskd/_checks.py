"""Argument checks shared by the core modules; each raises an error naming the argument."""

from __future__ import annotations

import math

from torch import Tensor

from maskd.errors import UserTypeError, UserValueError

__all__ = ["check_features", "check_number", "check_same_shape"]


def check_features(x: object, name: str) -> None:
    """Require a floating-point ``[N, C, H, W]`` tensor with no empty dimension."""
    if not isinstance(x, Tensor):
        raise UserTypeError(
            f"{name} must be a torch.Tensor of shape [N, C, H, W], got {type(x).__name__}"
        )
    if x.dim() != 4:
        raise UserValueError(f"{name} must be 4-D [N, C, H, W], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise UserTypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.numel() == 0:
        raise UserValueError(f"{name} is empty: shape {tuple(x.shape)}")


def check_same_shape(a: Tensor, b: Tensor, name_a: str, name_b: str) -> None:
    """Require two tensors of identical shape."""
    if a.shape != b.shape:
        raise UserValueError(
            f"{name_a} and {name_b} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )


def check_number(
    value: object,
    name: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
) -> None:
    """Require a finite number (an int if ``integer``) in ``[low, high]`` (``(`` / ``)`` if open).

    The one check for numeric options: weights, temperatures, learning rates, step counts.
    """
    kind = "an integer" if integer else "a number"
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type:
        raise UserTypeError(f"{name} must be {kind}, got {value!r}")
    if not math.isfinite(value):
        raise UserValueError(f"{name} must be finite, got {value!r}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        left = "-inf" if low is None else f"{low:g}"
        right = "inf" if high is None else f"{high:g}"
        interval = f"{'(' if low_open or low is None else '['}{left}, {right}" + (
            ")" if high_open or high is None else "]"
        )
        raise UserValueError(f"{name} must be in {interval}, got {value!r}")
