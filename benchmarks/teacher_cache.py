"""What ``distill.teacher_cache`` saves on a distillation step of the detection quality table.

Setting: the models and batch of ``benchmarks/quality.py``'s ``detection_sparse_warmup`` task
(FCOS ResNet-50 FPN teacher, FCOS ResNet-18 FPN student, 128 px, batch 16, MasKD with T = 6
weighted tokens on the five FPN levels and the custom mask on), one thread, as in
``benchmarks/memory_format.py``. Four steps, interleaved step by step in one process:

- ``student``: the student's training step alone (no teacher): the floor;
- ``plain``: the MasKD step, the teacher's trunk run on the batch;
- ``miss``: the same with ``teacher_cache="backbone.body"`` on a batch the cache has not seen
  (every sample runs through the trunk alone, and is stored);
- ``hit``: the same on a batch it has seen (the trunk is skipped; the FPN still runs).

A table cell sees each of its 1,500 images about 5 times (500 steps of 16) in one of two
flips, so about a third of its samples are misses and two thirds hits (its log has the
fraction per step, ``train/teacher_cache/hits``). Reported: median step times, the median of
the per-step ratios to ``plain``, the losses of the first ``plain`` and ``miss`` steps (the
same batch: equal up to rounding), and the bytes the cache holds per sample.

    python benchmarks/teacher_cache.py [--steps 6] [--warmup 1] [--threads 1]

Writes benchmarks/results/teacher_cache_cpu.json.
"""

from __future__ import annotations

import statistics
import time

from torch import nn

from maskd import Distiller
from maskd.data.synth import classes
from memory_format import (
    BATCH,
    STUDENT,
    TEACHER,
    TrainStep,
    header,
    maskd_distiller,
    model,
    parse_args,
    scenes,
    write_report,
)

TRUNK = "backbone.body"
VARIANTS = ("student", "plain", "miss", "hit")


class Run(TrainStep):
    """One training step of a variant on its own copy of the initial weights."""

    def __init__(self, variant: str, num_classes: int, dry) -> None:
        student = model(STUDENT, num_classes)
        self.distiller: Distiller | None = None
        net: nn.Module = student.train()
        if variant != "student":
            cache = None if variant == "plain" else TRUNK
            teacher = model(TEACHER, num_classes)
            net = self.distiller = maskd_distiller(student, teacher, dry, teacher_cache=cache)
        super().__init__(net)


def measure(steps: int, warmup: int) -> dict:
    num_classes = len(classes("clutter"))
    seen = scenes(BATCH)
    dry = ([seen[0][0]],)
    runs = {v: Run(v, num_classes, dry) for v in VARIANTS}
    runs["hit"](*seen)  # the batch the hit steps see, stored once
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    first: dict[str, dict[str, float]] = {}
    for i in range(warmup + steps):
        fresh = seen if i == 0 else scenes(BATCH, seed=100 + i)  # step 0: plain and miss alike
        batches = {"student": seen, "plain": fresh, "miss": fresh, "hit": seen}
        for variant, run in runs.items():
            start = time.perf_counter()
            losses = run(*batches[variant])
            elapsed = time.perf_counter() - start
            if i == 0:
                first[variant] = losses
            if i >= warmup:
                times[variant].append(elapsed)
    hit_cache = runs["hit"].distiller.teacher_cache
    miss_cache = runs["miss"].distiller.teacher_cache
    assert hit_cache.misses == BATCH and miss_cache.hits == 0  # what each variant claims
    rel = max(abs(first["miss"][k] - v) / max(abs(v), 1e-12) for k, v in first["plain"].items())
    return {
        "median_step_s": {v: statistics.median(t) for v, t in times.items()},
        "all_step_s": times,
        "paired_median_ratio_to_plain": {
            v: statistics.median(a / b for a, b in zip(times[v], times["plain"], strict=True))
            for v in VARIANTS
        },
        "first_step_losses": {"plain": first["plain"], "miss": first["miss"]},
        "first_step_max_relative_loss_difference": rel,
        "cache_bytes_per_sample": hit_cache.bytes // len(hit_cache.store),
    }


def main() -> None:
    args = parse_args(__doc__)
    result = measure(args.steps, args.warmup)
    report = {**header("teacher_cache", args, cached_layer=TRUNK), **result}
    for v in VARIANTS:
        print(f"{v}: {result['median_step_s'][v]:.3f} s, "
              f"{result['paired_median_ratio_to_plain'][v]:.3f} of plain", flush=True)  # fmt: skip
    write_report(args, "teacher_cache", report)


if __name__ == "__main__":
    main()
