"""The Lightning data module: seeded, resumable, DDP-sharded loaders over any dataset."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.data import DataLoader, Dataset
from torch.utils.data import default_collate as torch_default_collate

from maskd.engine.sampling import (
    GroupedBatchSampler,
    ResumableSampler,
    SeededDataset,
    ShardedSampler,
)
from maskd.errors import UserValueError

__all__ = ["MaskdDataModule"]


class MaskdDataModule(L.LightningDataModule):
    """Training and validation loaders for one job.

    The training loader shuffles with :class:`ResumableSampler` (a seeded permutation
    per epoch, split across ranks; full batches only) and draws augmentation under
    per-sample seeds (:class:`SeededDataset`). Its position inside the epoch is part
    of the checkpoint, so ``--resume`` continues with exactly the batches an
    uninterrupted run would have seen. Validation is split across ranks without
    padding (every image is evaluated once).

    Args:
        train_set: training dataset (``None`` for evaluation-only jobs).
        val_set: validation dataset.
        batch_size: training batch size per process.
        val_batch_size: validation batch size per process.
        num_workers: loader worker processes.
        seed: base seed for order and augmentation.
        collate_fn: batch collation (``maskd.data.detection_collate`` for detection).
        group_ids: a group per training sample (e.g. ``maskd.engine.sampling.
            aspect_ratio_groups``); every training batch then holds one group
            (:class:`GroupedBatchSampler`). ``None``: batches of the plain order.
    """

    def __init__(
        self,
        train_set: Dataset | None,
        val_set: Dataset | None,
        batch_size: int = 2,
        val_batch_size: int = 2,
        num_workers: int = 0,
        seed: int = 0,
        collate_fn: Callable[[list], Any] | None = None,
        group_ids: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.train_set, self.val_set = train_set, val_set
        self.batch_size, self.val_batch_size = batch_size, val_batch_size
        self.num_workers, self.seed = num_workers, seed
        self.collate_fn = collate_fn or torch_default_collate
        if group_ids is not None and train_set is not None and len(group_ids) != len(train_set):
            raise UserValueError(
                f"{len(group_ids)} group ids for {len(train_set)} training samples"
            )
        self.group_ids = None if group_ids is None else list(group_ids)
        self._pending_skip: tuple[int, int] | None = None

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    def _loader(
        self, dataset: Dataset, sampler: Any, batch_size: int, drop_last: bool
    ) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=self.collate_fn,
            drop_last=drop_last,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            raise UserValueError("no training dataset configured")
        rank, world = self._rank_world()
        sampler = ResumableSampler(len(self.train_set), self.seed, True, rank, world)
        if len(sampler) < self.batch_size:
            raise UserValueError(
                f"data: {len(self.train_set)} training images are fewer than one batch "
                f"({self.batch_size} per process × {world} processes)"
            )
        dataset = SeededDataset(self.train_set, self.seed)
        if self.group_ids is not None:
            batches = GroupedBatchSampler(sampler, self.group_ids, self.batch_size)
            if self._pending_skip is not None:
                batches.skip(*self._pending_skip)
                self._pending_skip = None
            return DataLoader(
                dataset,
                batch_sampler=batches,
                num_workers=self.num_workers,
                collate_fn=self.collate_fn,
                persistent_workers=self.num_workers > 0,
            )
        if self._pending_skip is not None:
            sampler.skip(*self._pending_skip)
            self._pending_skip = None
        return self._loader(dataset, sampler, self.batch_size, True)

    def val_dataloader(self) -> DataLoader:
        if self.val_set is None:
            raise UserValueError("no validation dataset configured")
        rank, world = self._rank_world()
        sampler = ShardedSampler(len(self.val_set), rank, world)
        return self._loader(self.val_set, sampler, self.val_batch_size, False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def state_dict(self) -> dict[str, Any]:
        """Position inside the current training epoch (samples consumed by this rank)."""
        trainer = self.trainer
        if trainer is None or trainer.state.fn != TrainerFn.FITTING:
            return {}
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {"epoch": trainer.current_epoch, "samples": done * self.batch_size}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:
            self._pending_skip = (int(state_dict["epoch"]), int(state_dict["samples"]))
