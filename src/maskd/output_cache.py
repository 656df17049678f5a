"""A per-sample memo of a frozen sub-module's output, keyed by the bytes of its input sample.

A distillation run shows the teacher the same training images epoch after epoch (with a
random flip, each image has two versions), and the frozen teacher in eval mode maps each
sample to the same features every time. :class:`OutputCache` keeps what one of its
sub-modules returned for each sample it has seen, so an epoch after the first costs the
teacher little more than a lookup::

    cache = OutputCache(teacher.backbone.body, max_bytes=4 * 2**30)
    cache.attach()      # teacher.backbone.body now answers from the cache where it can
    ...
    cache.detach()      # and computes everything again

With a ``directory``, every computed sample is also written there (a file per sample, in a
folder named after the layer and a hash of its weights), and a sample missing from memory is
read from there first: runs of the same teacher, one after the other or side by side, share
the work.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from maskd.errors import UserRuntimeError, UserTypeError
from maskd.fingerprint import state_fingerprint

__all__ = ["OutputCache"]

Output = Any  # a tensor [N, ...], or a dict / list / tuple of them


def sample_key(x: Tensor, context: str = "") -> bytes:
    """BLAKE2b (16 bytes) of one sample's dtype, shape and values (layout-independent), and of
    ``context``: what else decides the output (the autocast dtype the layer runs in)."""
    data = x.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{x.dtype}|{tuple(x.shape)}|".encode())
    if context:
        digest.update(f"{context}|".encode())
    digest.update(data.tobytes())
    return digest.digest()


def _split(out: Output, n: int, path: str) -> list[Output]:
    """The per-sample parts ``[1, ...]`` of a batched output."""
    if isinstance(out, Tensor):
        if out.dim() == 0 or out.shape[0] != n:
            raise UserRuntimeError(
                f"the cached layer {path!r} returned a tensor of shape {tuple(out.shape)}, "
                f"not one row per sample of its batch of {n}: it cannot be cached per sample"
            )
        return [out[i : i + 1].clone() for i in range(n)]
    if isinstance(out, dict):
        parts = {k: _split(v, n, path) for k, v in out.items()}
        return [type(out)((k, v[i]) for k, v in parts.items()) for i in range(n)]
    if isinstance(out, list | tuple):
        columns = [_split(v, n, path) for v in out]
        return [type(out)(col[i] for col in columns) for i in range(n)]
    raise UserRuntimeError(
        f"the cached layer {path!r} returned a {type(out).__name__}; a cached layer must "
        "return a tensor, or a dict / list / tuple of tensors"
    )


def _join(parts: list[Output]) -> Output:
    """The batch ``[N, ...]`` of per-sample parts (inverse of :func:`_split`)."""
    first = parts[0]
    if isinstance(first, Tensor):
        return torch.cat(parts)
    if isinstance(first, dict):
        return type(first)((k, _join([p[k] for p in parts])) for k in first)
    return type(first)(_join([p[i] for p in parts]) for i in range(len(first)))


def _nbytes(part: Output) -> int:
    if isinstance(part, Tensor):
        return part.numel() * part.element_size()
    values = part.values() if isinstance(part, dict) else part
    return sum(_nbytes(v) for v in values)


class OutputCache:
    """Serve a frozen sub-module's output per sample from memory, for samples it has seen.

    The module must map each sample of its batch on its own and always alike: frozen, in eval
    mode (BatchNorm on running statistics, dropout off), as a distiller's teacher is. Its first
    positional argument is a tensor ``[N, ...]``; its output a tensor ``[N, ...]`` or a dict
    / list / tuple of such tensors (an FPN trunk's ``OrderedDict`` of maps).

    Each sample the cache has not seen is computed alone (a batch of one) and stored, so what
    the cache holds does not depend on which samples shared its batch: a run with the cache is
    reproducible and resumes exactly, and differs from the uncached batched forward only by
    floating-point rounding. Once ``max_bytes`` are held, further samples are computed (alone)
    and not stored. Forward hooks on the module still run on every call.

    Args:
        module: the sub-module to cache (its ``forward`` is wrapped while attached).
        max_bytes: the most bytes of outputs held in memory.
        name: how errors name the module (its layer path).
        directory: where computed samples are also written and looked up, or ``None``. The
            files go to ``directory/<name>-<hash of the module's state>/``, so another
            module's (or other weights') outputs are never read; a file that cannot be read
            is computed again and rewritten.
    """

    def __init__(
        self,
        module: nn.Module,
        max_bytes: int,
        name: str = "",
        directory: str | os.PathLike[str] | None = None,
    ) -> None:
        if not isinstance(module, nn.Module):
            raise UserTypeError(f"module must be an nn.Module, got {type(module).__name__}")
        self.module = module
        self.max_bytes = int(max_bytes)
        self.name = name or type(module).__name__
        self.store: dict[bytes, Output] = {}
        self.bytes = 0
        self.hits = 0  # samples served from memory or from the directory
        self.loaded = 0  # of the hits, those read from the directory
        self.misses = 0  # samples computed
        self._original: Callable[..., Any] | None = None
        self.folder: Path | None = None
        if directory is not None:
            label = "".join(c if c.isalnum() or c in "._-" else "_" for c in self.name)
            self.folder = Path(directory) / f"{label}-{state_fingerprint(module)[:16]}"
            self.folder.mkdir(parents=True, exist_ok=True)

    @property
    def attached(self) -> bool:
        return self._original is not None

    def attach(self) -> None:
        """Wrap the module's ``forward`` so that it answers from the cache."""
        if self.attached:
            return
        self._original = self.module.forward
        object.__setattr__(self.module, "forward", self._forward)

    def detach(self) -> None:
        """Give the module its own ``forward`` back (the stored outputs stay)."""
        if self._original is None:
            return
        if "forward" in vars(self.module):
            object.__delattr__(self.module, "forward")
        self._original = None

    def clear(self) -> None:
        """Drop every stored output."""
        self.store.clear()
        self.bytes = 0

    def _forward(self, x: Any, *args: Any, **kwargs: Any) -> Output:
        assert self._original is not None
        if not isinstance(x, Tensor) or x.dim() == 0:
            raise UserTypeError(
                f"the cached layer {self.name!r} must take a batched tensor [N, ...] first, "
                f"got {type(x).__name__}"
            )
        if torch.is_grad_enabled() and x.requires_grad:
            raise UserRuntimeError(
                f"the cached layer {self.name!r} was called on an input that needs gradients; "
                "only a frozen module run under torch.no_grad() can be cached"
            )
        # the same sample under autocast (bf16-mixed, 16-mixed) gives other values: other keys
        device = x.device.type
        context = (
            f"autocast={torch.get_autocast_dtype(device)}"
            if torch.is_autocast_enabled(device)
            else ""
        )
        keys = [sample_key(x[i], context) for i in range(x.shape[0])]
        parts: list[Output] = []
        for i, key in enumerate(keys):
            part = self.store.get(key)
            if part is None:
                part = self._read(key, x.device)
                if part is None:
                    part = _split(self._original(x[i : i + 1], *args, **kwargs), 1, self.name)[0]
                    self.misses += 1
                    self._write(key, part)
                else:
                    self.hits += 1
                    self.loaded += 1
                self._keep(key, part)
            else:
                self.hits += 1
            parts.append(part)
        return _join(parts)

    def _keep(self, key: bytes, part: Output) -> None:
        size = _nbytes(part)
        if self.bytes + size <= self.max_bytes:
            self.store[key] = part
            self.bytes += size

    def _path(self, key: bytes) -> Path | None:
        return None if self.folder is None else self.folder / f"{key.hex()}.pt"

    def _read(self, key: bytes, device: torch.device) -> Output | None:
        path = self._path(key)
        if path is None or not path.is_file():
            return None
        try:
            return torch.load(path, map_location=device, weights_only=True)
        except Exception:  # a file cut short (a crash between write and rename's flush)
            return None

    def _write(self, key: bytes, part: Output) -> None:
        path = self._path(key)
        if path is None:
            return
        # no fsync: a cache file lost or cut short is computed again, never trusted blindly
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(part, f)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
