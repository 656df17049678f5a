"""Argument checks shared by the core modules; each raises an error naming the argument."""

from __future__ import annotations

from torch import Tensor

from maskd.errors import UserTypeError, UserValueError

__all__ = ["check_features", "check_same_shape"]


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
