"""What ``trainer.channels_last`` saves on the training steps of the detection quality table.

Setting: the models and batch of ``benchmarks/quality.py``'s ``detection_sparse_warmup`` task
(FCOS ResNet-50 FPN teacher, FCOS ResNet-18 FPN student, 128 px, batch 16, scale ranges ÷ 4,
``maskd data synth --difficulty clutter --object_scale 0.5`` scenes), one thread per process
as the table runs them. Three steps, each in the default (NCHW) layout and in channels-last
(NHWC), the layout ``trainer.channels_last`` gives every model (``module.to(memory_format=
torch.channels_last)``, :class:`maskd.engine.callbacks.ChannelsLast`):

- ``teacher``: one training step of the teacher (forward with losses, backward, SGD step);
- ``student``: the same for the student alone;
- ``maskd``: one MasKD distillation step (teacher up to the FPN, student, align connectors,
  masks with the custom student-side mask on, T = 6 weighted tokens per level, backward, SGD).

Each pair runs on two copies of the same initial weights, interleaved step by step in one
process so that a busy machine slows both alike; the ratio of a pair is the median of its
per-step ratios (NCHW / NHWC: above 1 means channels-last is faster), and the losses of each
pair's first step are compared (the same values up to rounding).

    python benchmarks/memory_format.py [--steps 6] [--warmup 1] [--threads 1]

Writes benchmarks/results/memory_format_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cpu_info import cpu_model
from distill_step import machine
from maskd import Distiller, ReceptiveTokens, total_loss
from maskd.data.synth import classes
from maskd.data.synth_scene import render_easy_scene
from maskd.models import build

RESULTS = Path(__file__).resolve().parent / "results"
SIZE, BATCH, TOKENS, LAYER = 128, 16, 6, "backbone.fpn"
RANGES = [[0, 16], [16, 32], [32, 64], [64, 128], [128, float("inf")]]
OPTIONS = {"min_size": SIZE, "max_size": SIZE, "regress_ranges": RANGES}
STUDENT = ("fcos_resnet18_fpn", {**OPTIONS, "box_regression_bias": 0.5})
TEACHER = ("fcos_resnet50_fpn", OPTIONS)
LAYOUTS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
STEPS = ("teacher", "student", "maskd")


def scenes(n: int, seed: int = 0) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """``n`` clutter scenes at 128 px with objects drawn at half scale, as the table's data."""
    rng = np.random.default_rng(seed)
    images, targets = [], []
    for _ in range(n):
        scene = render_easy_scene(rng, SIZE, clutter=True, object_scale=0.5)
        boxes = []
        for k in range(1, len(scene.labels) + 1):
            ys, xs = np.nonzero(scene.instances == k)
            boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        images.append(torch.from_numpy(scene.image).permute(2, 0, 1).float() / 255)
        targets.append(
            {
                "boxes": torch.tensor(boxes, dtype=torch.float32),
                "labels": torch.tensor(scene.labels, dtype=torch.int64),
            }
        )
    return images, targets


def model(name_options: tuple[str, dict], num_classes: int) -> nn.Module:
    torch.manual_seed(0)
    return build(name_options[0], num_classes, **name_options[1])[0]


def maskd_distiller(student: nn.Module, teacher: nn.Module, dry, **options) -> Distiller:
    """The table's MasKD term on the five FPN levels (T = 6 weighted tokens, align connector,
    custom mask on from the first step) around ``student`` and ``teacher``, in training mode."""
    torch.manual_seed(1)
    tokens = {LAYER: [ReceptiveTokens(256, TOKENS, weighted=True) for _ in range(5)]}
    term = {"kind": "maskd", "student": LAYER, "teacher": LAYER, "tokens": tokens,
            "weight": 10.0, "align": True, "custom_mask_warmup": 0}  # fmt: skip
    return Distiller(student, teacher, [term], example_input=dry, **options).train()


class TrainStep:
    """One SGD training step of ``net`` (forward with losses, backward, step); with
    ``autocast``, the forward runs under CPU autocast to that dtype, as ``trainer.precision=
    bf16-mixed`` runs it (the weights and the optimizer stay float32)."""

    def __init__(self, net: nn.Module, autocast: torch.dtype | None = None) -> None:
        self.net = net
        self.autocast = autocast
        params = [p for p in net.parameters() if p.requires_grad]
        self.opt = torch.optim.SGD(params, lr=1e-4, momentum=0.9, weight_decay=1e-4)

    def __call__(self, images, targets) -> dict[str, float]:
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=self.autocast, enabled=self.autocast is not None):
            losses = self.net(images, targets)
        total_loss(losses).backward()
        self.opt.step()
        return {k: float(v.detach()) for k, v in losses.items() if "/" not in k}


class Step(TrainStep):
    """One training step of one kind in one layout (and autocast dtype), on its own copy of
    the weights."""

    def __init__(
        self,
        kind: str,
        layout: torch.memory_format,
        num_classes: int,
        dry,
        autocast: torch.dtype | None = None,
    ) -> None:
        if kind == "maskd":
            student, teacher = model(STUDENT, num_classes), model(TEACHER, num_classes)
            net: nn.Module = maskd_distiller(student, teacher, dry)
        else:
            net = model(TEACHER if kind == "teacher" else STUDENT, num_classes).train()
        super().__init__(net.to(memory_format=layout), autocast)


def interleave(runs: dict[str, TrainStep], batch, steps: int, warmup: int) -> dict[str, object]:
    """Steps of ``runs`` interleaved one by one on ``batch`` (a busy machine slows each alike):
    each run's step times after ``warmup``, the losses of its first step, and the paired
    median ratio of the first run's step time to the second's (above 1: the second is faster),
    with the largest relative difference between their first-step losses."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    first: dict[str, dict[str, float]] = {}
    for i in range(warmup + steps):
        for name, run in runs.items():
            start = time.perf_counter()
            losses = run(*batch)
            elapsed = time.perf_counter() - start
            if i == 0:
                first[name] = losses
            if i >= warmup:
                times[name].append(elapsed)
    a, b = runs
    ratios = [x / y for x, y in zip(times[a], times[b], strict=True)]
    rel = max(abs(first[b][k] - v) / max(abs(v), 1e-12) for k, v in first[a].items())
    return {
        "median_step_s": {n: statistics.median(t) for n, t in times.items()},
        "all_step_s": times,
        "paired_median_speedup": statistics.median(ratios),
        "first_step_losses": first,
        "first_step_max_relative_loss_difference": rel,
    }


def measure_pairs(
    make_runs: Callable[[str, int, tuple], dict[str, TrainStep]], steps: int, warmup: int
) -> dict[str, dict]:
    """For each kind of step in ``STEPS``, the two runs ``make_runs(kind, num_classes, dry)``
    interleaved on the table's batch (:func:`interleave`), printed as they finish."""
    images, targets = scenes(BATCH)
    num_classes = len(classes("clutter"))
    dry = ([images[0]],)
    out: dict[str, dict] = {}
    for kind in STEPS:
        runs = make_runs(kind, num_classes, dry)
        out[kind] = got = interleave(runs, (images, targets), steps, warmup)
        (a, ta), (b, tb) = got["median_step_s"].items()
        print(f"{kind}: {a} {ta:.3f} s, {b} {tb:.3f} s, speed-up "
              f"{got['paired_median_speedup']:.3f}, first-step losses differ by "
              f"{got['first_step_max_relative_loss_difference']:.1e} (relative)",
              flush=True)  # fmt: skip
        del runs
    return out


def layouts(kind: str, num_classes: int, dry) -> dict[str, TrainStep]:
    """The pair this benchmark compares: ``kind``'s step in the default and channels-last
    layouts."""
    return {name: Step(kind, layout, num_classes, dry) for name, layout in LAYOUTS.items()}


def parse_args(doc: str) -> argparse.Namespace:
    """The options the speed benchmarks of the table's steps share; sets the thread count."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    return args


def header(benchmark: str, args: argparse.Namespace, **setting: object) -> dict[str, object]:
    """What a report says of itself: the command, date, machine and setting."""
    return {
        "benchmark": benchmark,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {**machine(torch.device("cpu")), "cpu": cpu_model()},
        "setting": {
            "teacher": TEACHER[0],
            "student": STUDENT[0],
            "image_size": SIZE,
            "batch": BATCH,
            **setting,
            "steps": args.steps,
            "warmup": args.warmup,
        },
    }


def write_report(args: argparse.Namespace, name: str, report: dict) -> Path:
    """Writes ``report`` as ``<args.out>/<name>_cpu.json`` and says where."""
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{name}_cpu.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")
    return path


def main() -> None:
    args = parse_args(__doc__)
    maskd = f"T = {TOKENS} weighted tokens on 5 FPN levels, custom mask on, align"
    report = {**header("memory_format", args, maskd=maskd),
              "steps": measure_pairs(layouts, args.steps, args.warmup)}  # fmt: skip
    write_report(args, "memory_format", report)


if __name__ == "__main__":
    main()
