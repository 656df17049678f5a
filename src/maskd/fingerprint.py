"""A module's identity by value: one hash over its state dict."""

from __future__ import annotations

import hashlib

import torch
from torch import nn

__all__ = ["state_fingerprint"]


def state_fingerprint(module: nn.Module) -> str:
    """SHA-256 (hex) over a module's state dict: every entry's name, dtype, shape and bytes
    (in the default layout, so a channels-last copy hashes alike)."""
    digest = hashlib.sha256()
    for name, value in module.state_dict().items():
        t = value.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{t.dtype}|{tuple(value.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
