"""Atomic checkpoint files.

A checkpoint is written to a temporary file in the same directory, flushed and
fsync'ed, then moved over the target with ``os.replace`` (atomic on POSIX and Windows;
see ``maskd.atomic``). A crash at any point leaves either the previous file or the new
one, never a truncated mix.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

from maskd.atomic import atomic_torch_save

__all__ = ["AtomicCheckpointIO", "atomic_save", "find_last_checkpoint"]


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj, path)`` that never leaves a partial file at ``path``."""
    return atomic_torch_save(obj, path)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO whose saves go through :func:`atomic_save` (local paths)."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None
    ) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO does not take storage_options")
        protocol = getattr(get_filesystem(path), "protocol", "file")
        protocols = protocol if isinstance(protocol, tuple) else (protocol,)
        if not {"file", "local"} & set(protocols):
            # Remote filesystems: fall back to Lightning's writer.
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        atomic_save(checkpoint, path)


def find_last_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """``<run_dir>/checkpoints/last.ckpt`` when it exists, else ``None``."""
    last = Path(run_dir) / "checkpoints" / "last.ckpt"
    return last if last.is_file() else None
