"""Samplers and a dataset wrapper that make training order and augmentation exact on resume.

- :class:`ResumableSampler` yields a seeded permutation per epoch, split across DDP ranks,
  and can start mid-epoch (what ``--resume`` needs so the resumed run sees the same
  batches as an uninterrupted one).
- :class:`SeededDataset` draws each sample's random augmentation from a generator
  seeded by ``(seed, epoch, index)``, so it depends neither on worker count nor on
  when a checkpoint was written.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler

from maskd.errors import UserValueError

__all__ = ["ResumableSampler", "SeededDataset", "ShardedSampler", "mix_seed"]


def mix_seed(*values: int) -> int:
    """Combine integers into one 63-bit seed (deterministic, order-sensitive)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


class ResumableSampler(Sampler):
    """Seeded shuffling sampler, sharded over ranks, resumable mid-epoch.

    Yields ``(epoch, index)`` pairs (read by :class:`SeededDataset`). Rank ``r`` of ``W``
    takes positions ``r, r + W, ...`` of the epoch's permutation, padded by wrapping
    so every rank gets the same count; consecutive ``W`` positions therefore form one
    global batch row, and a single process with ``W``× the batch size sees the same
    samples per step.

    Args:
        size: dataset length.
        seed: base seed of the permutations.
        shuffle: permute per epoch (else the natural order).
        rank: this process's rank.
        world_size: number of processes.
    """

    def __init__(
        self, size: int, seed: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1
    ) -> None:
        if size <= 0:
            raise UserValueError("ResumableSampler: the dataset is empty")
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self._skip: dict[int, int] = {}

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of every epoch."""
        self.epoch = epoch

    def skip(self, epoch: int, samples: int) -> None:
        """Start ``epoch`` after its first ``samples`` samples (of this rank)."""
        self._skip = {epoch: samples}

    def __len__(self) -> int:
        return -(-self.size // self.world_size)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        if self.shuffle:
            g = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        total = len(self) * self.world_size
        order = (order * (total // self.size + 1))[:total]
        mine = order[self.rank :: self.world_size]
        start = self._skip.pop(epoch, 0)
        for idx in mine[start:]:
            yield epoch, idx


class ShardedSampler(Sampler):
    """Deterministic, unpadded split of ``range(size)`` over ranks, for evaluation."""

    def __init__(self, size: int, rank: int = 0, world_size: int = 1) -> None:
        self.indices = list(range(size))[rank::world_size]

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)


class SeededDataset(Dataset):
    """Wrap a dataset so item ``(epoch, i)`` is drawn under a fixed RNG seed.

    The global torch RNG (which ``torchvision.transforms.v2`` uses) is forked, seeded with
    ``mix_seed(seed, epoch, i)`` for the call, and restored afterwards.
    Plain integer indices are accepted too (epoch 0).
    """

    def __init__(self, dataset: Dataset, seed: int = 0) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: Any) -> Any:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(mix_seed(self.seed, epoch, index))
            return self.dataset[index]
