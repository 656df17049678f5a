"""A quality cell's training log: the metrics its CSV logger wrote (``csv/version_*/
metrics.csv`` in the cell's folder), and the copy of its losses kept in its result.

A finished student cell's result keeps its ``train/*`` losses (``train_log``), so the
analyses of the logs (early spikes, loss scales) also read cells whose work folder is gone.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any


def read_log(cell: Path) -> dict[str, list[tuple[int, float]]]:
    """``{metric: [(step, value)]}``, steps ascending, over every CSV log version of
    ``cell`` (a resumed cell starts a new version; where two versions log the same step,
    the later one's value stands). {} where the cell has no log."""
    logs = sorted(cell.glob("csv/version_*/metrics.csv"), key=lambda p: int(p.parent.name[8:]))
    points: dict[str, dict[int, float]] = {}
    for log in logs:
        with log.open(newline="") as f:
            for row in csv.DictReader(f):
                for key, value in row.items():
                    if key not in ("epoch", "step") and value:
                        points.setdefault(key, {})[int(row["step"])] = float(value)
    return {key: sorted(by_step.items()) for key, by_step in points.items()}


def train_log(cell: Path) -> dict[str, list[Any]]:
    """The cell's training losses for its result: ``{"step": [...], metric: [...]}``, one
    entry per logged step (None where a metric was not logged at that step), every
    ``train/*`` metric but the per-layer ones (``train/cwd/backbone.fpn:0``)."""
    log = {
        k: dict(v)
        for k, v in read_log(cell).items()
        if k.startswith("train/") and k.count("/") == 1
    }
    steps = sorted({s for by_step in log.values() for s in by_step})
    return {"step": steps, **{k: [by_step.get(s) for s in steps] for k, by_step in log.items()}}


def kept_curve(kept: dict[str, list[Any]], key: str) -> list[tuple[int, float]]:
    """``[(step, value)]`` of one metric of a result's ``train_log``."""
    return [(s, v) for s, v in zip(kept["step"], kept.get(key, []), strict=False) if v is not None]


def curve(cell: Path, key: str, kept: dict[str, Any] | None = None) -> list[tuple[int, float]]:
    """``[(step, value)]`` of one logged metric: from the cell's log where its folder has
    one, else from the ``train_log`` of its result ``kept`` (a cell kept elsewhere)."""
    log = read_log(cell)
    if log:
        points = log.get(key, [])
    elif kept is not None and "train_log" in kept:
        points = kept_curve(kept["train_log"], key)
    else:
        raise FileNotFoundError(
            f"{cell}: no training log (csv/version_*/metrics.csv), nor one kept in its result"
        )
    if not points:
        raise ValueError(f"{cell}: its training log has no {key!r} values")
    return points
