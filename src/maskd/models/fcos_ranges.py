"""FCOS with a configurable scale range per FPN level (mmdet's ``regress_ranges``).

FCOS makes a location of level l a positive for a box when the location lies inside the box,
within ``center_sampling_radius`` strides of its centre, and the largest of its four distances
to the box's sides falls in level l's range; a location inside several boxes takes the
smallest. torchvision fixes the ranges to ``(4·s_l, 8·s_l)`` for the anchor size ``s_l``
(8 … 128 on P3–P7): ``(0, 64), (64, 128), (128, 256), (256, 512), (512, ∞)``, made for images
of ~800 px. On small images every object then falls in P3's range, and P4–P7 carry no
positive at all. ``regress_ranges`` sets the ranges (mmdet's ``FCOSHead.regress_ranges``);
the rest of the loss is torchvision's. Ranges affect training only: inference, weights and
their names are unchanged. The bounds are strict, as torchvision's (``low < d < high``);
mmdet's are inclusive (``low <= d <= high``, its first ``low`` being -1), which differs only
for a location whose largest distance falls exactly on a bound.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchvision.models.detection import FCOS

from maskd.errors import UserValueError

__all__ = ["RangedFCOS", "check_regress_ranges", "match_locations"]

Ranges = tuple[tuple[float, float], ...]


def check_regress_ranges(value: object, num_levels: int) -> Ranges:
    """``value`` as ``num_levels`` pairs ``(low, high)`` with ``low < high``; ``high`` may be
    ``inf`` (YAML ``.inf`` or the string ``"inf"``)."""
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != num_levels:
        raise UserValueError(
            f"regress_ranges must be {num_levels} pairs [low, high], one per FPN level, "
            f"got {value!r}"
        )
    ranges = []
    for level, pair in enumerate(value):
        if not isinstance(pair, Sequence) or isinstance(pair, str) or len(pair) != 2:
            raise UserValueError(
                f"regress_ranges[{level}] must be a pair [low, high], got {pair!r}"
            )
        bounds = []
        for bound in pair:
            if isinstance(bound, bool) or not isinstance(bound, int | float | str):
                raise UserValueError(f"regress_ranges[{level}] must hold numbers, got {pair!r}")
            try:
                bounds.append(float(bound))
            except ValueError:
                raise UserValueError(
                    f"regress_ranges[{level}] must hold numbers (or 'inf'), got {pair!r}"
                ) from None
        low, high = bounds
        if math.isnan(low) or math.isnan(high) or not low < high or low == math.inf:
            raise UserValueError(f"regress_ranges[{level}] needs low < high, got {pair!r}")
        ranges.append((low, high))
    return tuple(ranges)


def match_locations(
    points: Tensor,
    strides: Tensor,
    low: Tensor,
    high: Tensor,
    boxes: Tensor,
    radius: float,
) -> Tensor:
    """The box index each location is a positive for, or -1.

    ``points`` ``[P, 2]`` location centres (x, y); ``strides``, ``low``, ``high`` ``[P]``: each
    location's sampling unit and scale range; ``boxes`` ``[M, 4]`` (x0, y0, x1, y1).
    Returns ``[P]`` int64. Conditions are strict (``low < d < high``), as torchvision's.
    """
    if boxes.numel() == 0:
        return torch.full((points.shape[0],), -1, dtype=torch.int64, device=points.device)
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    near = (points[:, None] - centres[None]).abs().amax(dim=2) < radius * strides[:, None]
    sides = torch.cat(
        [points[:, None] - boxes[None, :, :2], boxes[None, :, 2:] - points[:, None]], 2
    )
    reach = sides.amax(dim=2)
    ok = near & (sides.amin(dim=2) > 0) & (reach > low[:, None]) & (reach < high[:, None])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    # the smallest box among a location's candidates (the first one on a tie)
    candidate_areas = torch.where(ok, areas[None], torch.full_like(ok, math.inf, dtype=areas.dtype))
    matched = candidate_areas.argmin(dim=1)
    matched[~ok.any(dim=1)] = -1
    return matched


class RangedFCOS(FCOS):
    """torchvision's ``FCOS`` with ``regress_ranges`` (one ``(low, high)`` per FPN level)."""

    def __init__(self, *args: Any, regress_ranges: Ranges, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.regress_ranges = regress_ranges

    def compute_loss(
        self,
        targets: list[dict[str, Tensor]],
        head_outputs: dict[str, Tensor],
        anchors: list[Tensor],
        num_anchors_per_level: list[int],
    ) -> dict[str, Tensor]:
        """torchvision's loss, with locations matched under :attr:`regress_ranges`."""
        if len(num_anchors_per_level) != len(self.regress_ranges):
            raise UserValueError(
                f"regress_ranges has {len(self.regress_ranges)} levels but the model "
                f"predicts on {len(num_anchors_per_level)}"
            )
        counts = torch.tensor(num_anchors_per_level, device=anchors[0].device)
        bounds = torch.tensor(self.regress_ranges, dtype=anchors[0].dtype, device=counts.device)
        low, high = bounds.repeat_interleave(counts, dim=0).unbind(dim=1)
        matched_idxs = []
        for anchors_per_image, targets_per_image in zip(anchors, targets, strict=True):
            points = (anchors_per_image[:, :2] + anchors_per_image[:, 2:]) / 2
            strides = anchors_per_image[:, 2] - anchors_per_image[:, 0]
            matched_idxs.append(
                match_locations(
                    points,
                    strides,
                    low,
                    high,
                    targets_per_image["boxes"],
                    self.center_sampling_radius,
                )
            )
        return self.head.compute_loss(targets, head_outputs, anchors, matched_idxs)
