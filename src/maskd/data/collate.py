"""Batching: detection samples vary in size and box count, so they stay in lists."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import default_collate

from maskd.errors import UserValueError


def detection_collate(
    batch: Sequence[tuple[torch.Tensor, dict[str, Any]]],
) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """[(image [3,H,W], target)] → (list of images, list of targets), order kept."""
    images = [sample[0] for sample in batch]
    targets = [sample[1] for sample in batch]
    return images, targets


def collate_for(task: str) -> Callable[[Sequence[Any]], Any]:
    """The collate function a DataLoader needs for `task`.

    detection → `detection_collate`; segmentation → torch's default collate, giving
    (images [N,3,H,W], masks [N,H,W]) — samples must share one size (crop or resize).
    """
    if task == "detection":
        return detection_collate
    if task == "segmentation":
        return default_collate
    raise UserValueError(f"unknown task {task!r}; expected 'detection' or 'segmentation'")
