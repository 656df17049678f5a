"""Cost of one MasKD distillation step against the work it cannot avoid.

Setting of the issue: RetinaNet ResNet-50 FPN teacher → RetinaNet ResNet-18 FPN student,
256x256 images, batch 2, tokens on the five FPN outputs (T = 6, weighted), loss weight 7.

- ``baseline``: one plain student training step (forward, backward, SGD step) plus one
  teacher forward under ``torch.no_grad()`` stopped at the tapped layer — the floor any
  feature distillation pays.
- ``maskd``: one ``Distiller`` training step (teacher up to the taps, student, align
  modules, masks and loss, backward, SGD step).
- ``maskd_custom``: the same with the custom (student-side) mask switched on, the authors'
  setting after warm-up.
- ``maskd_custom_head_kd``: plus the authors' L1 KD on the box-regression outputs (the
  teacher then also runs its regression branch), their full RetinaNet setting.
- ``fitnet``, ``cwd``, ``fgd``: the peer methods alone (``maskd.terms``) on the same levels,
  at their papers' defaults (FGD: the authors' RetinaNet coefficients).

Timing interleaves the variants step by step in one process, so a busy machine slows all of
them alike. The headline time of a variant is its fastest step over ``--steps`` steps after
``--warmup`` (the least disturbed one on a shared machine); the median and the median of the
per-step ratios to the baseline step run right before are reported too. ``--threads`` sets
``torch.set_num_threads`` (default 1: oversubscribed CPU threads make timings erratic).
Peak memory is measured per variant in a fresh subprocess: on CUDA
``torch.cuda.max_memory_allocated`` during the steps, on CPU the rise of the process's peak
resident set over its resident set before the first step.

    python benchmarks/distill_step.py [--device cpu|cuda] [--steps 8] [--warmup 1] [--threads 1]

Writes benchmarks/results/distill_step_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from torch import nn
from torchvision.models.detection import RetinaNet, retinanet_resnet50_fpn
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from maskd import Distiller, FeatureTaps, ReceptiveTokens, total_loss
from maskd.taps import probe_levels

RESULTS = Path(__file__).resolve().parent / "results"
SIZE, BATCH, CLASSES, TOKENS, LAYER = 256, 2, 80, 6, "backbone.fpn"
VARIANTS = ["baseline", "maskd", "maskd_custom", "maskd_custom_head_kd", "fitnet", "cwd", "fgd"]
PEERS = {
    "fitnet": {"kind": "fitnet"},
    "cwd": {"kind": "cwd", "weight": 10.0},
    "fgd": {"kind": "fgd", "detector": "retinanet"},
}


def build(device: torch.device) -> tuple[nn.Module, nn.Module, dict[str, list[ReceptiveTokens]]]:
    torch.manual_seed(0)
    teacher = retinanet_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=CLASSES, min_size=SIZE, max_size=SIZE
    )
    backbone = resnet_fpn_backbone(
        backbone_name="resnet18",
        weights=None,
        trainable_layers=5,
        returned_layers=[2, 3, 4],
        extra_blocks=LastLevelP6P7(256, 256),
    )
    student = RetinaNet(backbone, num_classes=CLASSES, min_size=SIZE, max_size=SIZE)
    tokens = {LAYER: [ReceptiveTokens(256, TOKENS, weighted=True) for _ in range(5)]}
    return student.to(device), teacher.to(device), tokens


def batch(device: torch.device) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, SIZE, SIZE, generator=g).to(device) for _ in range(BATCH)]
    targets = [
        {
            "boxes": torch.tensor([[16.0, 24.0, 120.0, 200.0], [100.0, 60.0, 240.0, 180.0]]),
            "labels": torch.tensor([3, 17]),
        }
        for _ in range(BATCH)
    ]
    return images, [{k: v.to(device) for k, v in t.items()} for t in targets]


class Steps:
    """One callable training step per variant, all sharing the same student and teacher."""

    def __init__(self, device: torch.device, variants: list[str]) -> None:
        student, teacher, tokens = build(device)
        self.images, self.targets = batch(device)
        dry = (self.images,)
        self.student, self.teacher = student.train(), teacher.eval()
        self.taps = FeatureTaps(teacher, [LAYER], stop=True)
        self.distillers = {}
        for name in variants:
            if name.startswith("maskd"):
                maskd = {"kind": "maskd", "student": LAYER, "teacher": LAYER, "tokens": tokens,
                         "weight": 7.0}  # fmt: skip
                if name.startswith("maskd_custom"):
                    maskd["custom_mask_warmup"] = 0
                terms = [maskd, *([{"kind": "retinanet_l1"}] if name.endswith("head_kd") else [])]
            elif name in PEERS:
                terms = [{**PEERS[name], "student": LAYER, "teacher": LAYER}]
            else:
                continue
            self.distillers[name] = Distiller(student, teacher, terms, example_input=dry).train()
        if not self.distillers:
            # The dry runs a Distiller makes at construction, so every variant's process
            # starts equally warmed up (this matters for the peak-memory measurement).
            probe_levels(student, [LAYER], dry)
            probe_levels(teacher, [LAYER], dry)
        params = list(student.parameters())
        params += [
            p for d in self.distillers.values() for p in d.terms.parameters() if p.requires_grad
        ]
        self.opt = torch.optim.SGD(params, lr=1e-4, momentum=0.9)
        for p in teacher.parameters():
            p.requires_grad_(False)

    def __call__(self, variant: str) -> None:
        self.opt.zero_grad(set_to_none=True)
        if variant == "baseline":
            with torch.no_grad():
                self.taps.run(self.images)  # features stay alive through the step, as in KD
            losses = self.student(self.images, self.targets)
        else:
            losses = self.distillers[variant](self.images, self.targets)
        total_loss(losses).backward()
        self.opt.step()
        self.taps.clear()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_variants(device: torch.device, steps: int, warmup: int) -> dict[str, list[float]]:
    run = Steps(device, VARIANTS)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for i in range(warmup + steps):
        for variant in VARIANTS:
            sync(device)
            start = time.perf_counter()
            run(variant)
            sync(device)
            if i >= warmup:
                times[variant].append(time.perf_counter() - start)
    return times


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_worker(variant: str, device_name: str) -> None:
    """Run a few steps of one variant and print its peak extra memory in bytes."""
    device = torch.device(device_name)
    run = Steps(device, [variant])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        base = _rss_bytes()
    for _ in range(2):
        run(variant)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    print(json.dumps({"peak_extra_bytes": peak}))


def measure_memory(variant: str, device: str, threads: int) -> int:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [sys.executable, __file__, "--memory-worker", variant, "--device", device]
    cmd += ["--threads", str(threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return int(json.loads(out.strip().splitlines()[-1])["peak_extra_bytes"])


def machine(device: torch.device) -> dict[str, object]:
    info: dict[str, object] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "processor": platform.processor() or platform.machine(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads; 0 = default")
    parser.add_argument("--memory-worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.memory_worker:
        memory_worker(args.memory_worker, args.device)
        return
    device = torch.device(args.device)
    times = time_variants(device, args.steps, args.warmup)
    best = {v: min(t) for v, t in times.items()}
    median = {v: statistics.median(t) for v, t in times.items()}
    paired = {
        v: statistics.median(a / b for a, b in zip(times[v], times["baseline"], strict=True))
        for v in VARIANTS
        if v != "baseline"
    }
    memory = {v: measure_memory(v, args.device, args.threads) for v in VARIANTS}
    result = {
        "benchmark": "distill_step",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": str(device),
        "machine": machine(device),
        "setting": {
            "teacher": "retinanet_resnet50_fpn",
            "student": "retinanet_resnet18_fpn",
            "image_size": SIZE,
            "batch": BATCH,
            "num_classes": CLASSES,
            "tokens": f"{TOKENS} per FPN level, weighted, 5 levels",
            "steps": args.steps,
            "warmup": args.warmup,
        },
        "best_step_s": best,
        "median_step_s": median,
        "all_step_s": times,
        "peak_extra_memory_mib": {v: round(b / 2**20, 1) for v, b in memory.items()},
        "time_ratio": {v: best[v] / best["baseline"] for v in VARIANTS if v != "baseline"},
        "paired_median_time_ratio": paired,
        "memory_ratio": {v: memory[v] / memory["baseline"] for v in VARIANTS if v != "baseline"},
        "target_time_ratio": 1.10,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"distill_step_{device.type}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print("| variant | best step (s) | median step (s) | time ratio | peak extra memory (MiB) |")
    print("|---|---|---|---|---|")
    for v in VARIANTS:
        ratio = 1.0 if v == "baseline" else result["time_ratio"][v]
        mem = result["peak_extra_memory_mib"][v]
        print(f"| {v} | {best[v]:.3f} | {median[v]:.3f} | {ratio:.3f} | {mem} |")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
