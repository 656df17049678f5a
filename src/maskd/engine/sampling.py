"""Samplers and a dataset wrapper that make training order and augmentation exact on resume.

- :class:`ResumableSampler` yields a seeded permutation per epoch, split across DDP ranks,
  and can start mid-epoch (what ``--resume`` needs so the resumed run sees the same
  batches as an uninterrupted one).
- :class:`GroupedBatchSampler` batches a :class:`ResumableSampler`'s order so that every
  batch holds images of one aspect-ratio group (:func:`aspect_ratio_groups`), as
  torchvision's detection references do; its batches depend only on (seed, epoch, rank),
  so it resumes mid-epoch just as exactly.
- :class:`SeededDataset` draws each sample's random augmentation from a generator
  seeded by ``(seed, epoch, index)``, so it depends neither on worker count nor on
  when a checkpoint was written.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler, Subset

from maskd.errors import UserValueError

__all__ = [
    "GroupedBatchSampler",
    "ResumableSampler",
    "SeededDataset",
    "ShardedSampler",
    "aspect_ratio_groups",
    "group_batches",
    "image_sizes",
    "mix_seed",
]


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

    def order(self, epoch: int) -> list[int]:
        """This rank's dataset indices for ``epoch``, in order (``len(self)`` of them)."""
        if self.shuffle:
            g = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        total = len(self) * self.world_size
        order = (order * (total // self.size + 1))[:total]
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        start = self._skip.pop(epoch, 0)
        for idx in self.order(epoch)[start:]:
            yield epoch, idx


def aspect_ratio_groups(sizes: Sequence[tuple[int, int]], factor: int) -> list[int]:
    """Aspect-ratio group of each image, from its ``(height, width)``.

    The ratio ``height / width`` is binned at the edges ``2 ** linspace(-1, 1, 2 * factor + 1)``
    (torchvision's detection references, which use ``factor`` 3: 8 groups); an image's group
    is the number of edges at or below its ratio, ``0 .. 2 * factor + 1``. ``factor`` 0 has
    the single edge 1: landscape images (group 0) apart from square and portrait ones, the
    same split as mmdet's ``GroupSampler`` (flag ``width / height > 1``).
    """
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 0:
        raise UserValueError(f"aspect-ratio group factor must be an int >= 0, got {factor!r}")
    edges = [2.0 ** (i / factor - 1) for i in range(2 * factor + 1)] if factor else [1.0]
    groups = []
    for h, w in sizes:
        if h <= 0 or w <= 0:
            raise UserValueError(f"image size must be positive, got (height, width) = {(h, w)}")
        ratio = h / w
        groups.append(sum(edge <= ratio for edge in edges))
    return groups


def image_sizes(dataset: Dataset) -> list[tuple[int, int]]:
    """``(height, width)`` of every sample as the dataset's annotations state (no image read).

    The dataset needs an ``image_sizes()`` method (``maskd.data.CocoDetection`` has one);
    a ``Subset`` of such a dataset works too.
    """
    if isinstance(dataset, Subset):
        sizes = image_sizes(dataset.dataset)
        return [sizes[i] for i in dataset.indices]
    method = getattr(dataset, "image_sizes", None)
    if not callable(method):
        raise UserValueError(
            f"aspect-ratio grouping needs the image sizes from the annotations, which a "
            f"{type(dataset).__name__} dataset does not give (COCO datasets do)"
        )
    return [(int(h), int(w)) for h, w in method()]


def group_batches(
    order: Sequence[int], group_ids: Sequence[int], batch_size: int
) -> list[list[int]]:
    """Split ``order`` into ``len(order) // batch_size`` batches of one group each.

    Walking ``order``, a batch is complete as soon as ``batch_size`` samples of one group
    have been seen, so the batches follow ``order`` closely. The groups left partly filled
    at the end give the remaining batches, the fullest first (ties: the lower group id),
    each topped up with its group's first samples of ``order`` (repeated when the group has
    fewer than a batch). Every index of ``order`` appears except for leftovers that do not
    make up a further batch, as with ``drop_last``.
    """
    seen: dict[int, list[int]] = {}
    filling: dict[int, list[int]] = {}
    batches: list[list[int]] = []
    for idx in order:
        group = group_ids[idx]
        seen.setdefault(group, []).append(idx)
        batch = filling.setdefault(group, [])
        batch.append(idx)
        if len(batch) == batch_size:
            batches.append(batch)
            filling[group] = []
    missing = len(order) // batch_size - len(batches)
    partial = sorted((-len(b), g) for g, b in filling.items() if b)
    for _, group in partial[:missing]:
        batch, first = filling[group], seen[group]
        batch += [first[i % len(first)] for i in range(batch_size - len(batch))]
        batches.append(batch)
    return batches


class GroupedBatchSampler(Sampler):
    """Batches of one aspect-ratio group each, over a :class:`ResumableSampler`'s order.

    Each rank groups its own share of the epoch's permutation with :func:`group_batches`,
    so the batches depend only on (seed, epoch, rank), every rank has ``len(self)`` of them,
    and a resume skips whole batches. Yields lists of ``(epoch, index)`` for
    :class:`SeededDataset`; give it to a ``DataLoader`` as ``batch_sampler``.

    Args:
        sampler: the order (Lightning sets its epoch through ``self.sampler``).
        group_ids: the group of every dataset index (:func:`aspect_ratio_groups`).
        batch_size: samples per batch.
    """

    def __init__(
        self, sampler: ResumableSampler, group_ids: Sequence[int], batch_size: int
    ) -> None:
        if len(group_ids) != sampler.size:
            raise UserValueError(
                f"GroupedBatchSampler: {len(group_ids)} group ids for {sampler.size} samples"
            )
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise UserValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.sampler = sampler
        self.group_ids = list(group_ids)
        self.batch_size = batch_size
        self._skip: dict[int, int] = {}

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def skip(self, epoch: int, samples: int) -> None:
        """Start ``epoch`` after its first ``samples // batch_size`` batches (of this rank)."""
        self._skip = {epoch: samples // self.batch_size}

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch = self.sampler.epoch
        batches = group_batches(self.sampler.order(epoch), self.group_ids, self.batch_size)
        start = self._skip.pop(epoch, 0)
        for batch in batches[start:]:
            yield [(epoch, idx) for idx in batch]


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
