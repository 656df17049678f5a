"""Forward+backward time and peak extra memory of the MasKD loss and of mask_features.

Compares, at the five FPN shapes of an 800x1333 COCO image (N=2, C=256, T=6) and at one
small shape:

- loss: (a) the literal formulation that builds [N, T, C, H, W] tensors, (b) maskd's
  `masked_distillation_loss`, (c) plain MSE on the same features;
- mask_features: (a) the literal sum over an [N, T, C, H, W] tensor, (b) maskd's
  `ReceptiveTokens.mask_features`, (c) multiplying x by a fixed [N, 1, H, W] map (the
  floor: any masked feature must write its output and, in backward, x's gradient), and
  the token masks alone; unweighted tokens, since the weighting head costs the same in
  every variant.

Each measurement runs in ``--processes`` fresh subprocesses (default 3) and reports the
median over them of each one's median time (one process can land on a slower memory layout
than the next, by up to a quarter on a small VM) and the median peak memory. On CPU the peak extra memory is the rise of
the process's peak resident set over its resident set just before the first call
(glibc is told to serve every large block with mmap so freed memory leaves the RSS);
on CUDA it is `torch.cuda.max_memory_allocated` over the allocation before the call.

    python benchmarks/loss_kernel.py [--device cpu|cuda] [--repeats 5] [--processes 3]
                                     [--threads 1] [--quick]

Writes benchmarks/results/loss_kernel_<device>.json and .md.
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

RESULTS = Path(__file__).resolve().parent / "results"

# (name, H, W): FPN levels P2..P6 of an 800x1333 image padded to a multiple of 32, plus a small map.
SHAPES = [
    ("P2 200x336", 200, 336),
    ("P3 100x168", 100, 168),
    ("P4 50x84", 50, 84),
    ("P5 25x42", 25, 42),
    ("P6 13x21", 13, 21),
    ("small 16x16", 16, 16),
]
N, C, T = 2, 256, 6
KERNELS = {
    "loss": ["literal", "maskd", "mse"],
    "mask_features": ["literal", "maskd", "pixel_scale", "masks_only"],
}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _worker(
    kernel: str, method: str, h: int, w: int, device: str, repeats: int, threads: int
) -> dict:
    import torch
    import torch.nn.functional as F

    from maskd import ReceptiveTokens, masked_distillation_loss

    if threads > 0:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    dev = torch.device(device)
    # mask_features is timed without the weighting head: its conv3x3 costs the same in every
    # variant and would hide the part that differs.
    tok = ReceptiveTokens(C, T, weighted=kernel == "loss").to(dev)
    with torch.no_grad():
        tok.mask_token.normal_(0, 0.05)
    x = torch.randn(N, C, h, w, device=dev)
    t = torch.randn(N, C, h, w, device=dev)
    with torch.no_grad():
        masks = tok(t)
        weights = tok.token_weights(t)

    if kernel == "loss":
        s = x.requires_grad_()

        def literal() -> None:
            m = masks.unsqueeze(2)
            num = ((m * s.unsqueeze(1) - m * t.unsqueeze(1)) ** 2).sum(dim=(-1, -2))  # [N,T,C]
            per = num / masks.sum(dim=(-1, -2)).unsqueeze(-1)
            (weights * per.mean(dim=2)).sum(dim=1).mean().backward()

        def maskd() -> None:
            masked_distillation_loss(s, t, masks, weights).backward()

        def mse() -> None:
            F.mse_loss(s, t).backward()

        fns = {"literal": literal, "maskd": maskd, "mse": mse}
        params = [s]
    else:
        xg = x.requires_grad_()

        def literal() -> None:
            m = tok(xg)
            full = m.unsqueeze(2) * xg.unsqueeze(1)  # [N,T,C,H,W]
            full.sum(dim=1).sum().backward()

        def maskd() -> None:
            tok.mask_features(xg).sum().backward()

        scale = torch.rand(N, 1, h, w, device=dev)

        def pixel_scale() -> None:
            (xg * scale).sum().backward()

        def masks_only() -> None:
            tok(xg).sum().backward()

        fns = {
            "literal": literal,
            "maskd": maskd,
            "pixel_scale": pixel_scale,
            "masks_only": masks_only,
        }
        params = [xg, *tok.parameters()]

    fn = fns[method]

    def run() -> None:
        for p in params:
            p.grad = None
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()

    for p in params:
        p.grad = None
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        base = _rss_bytes()
        run()
        peak = max(_peak_rss_bytes() - base, 0)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "peak_extra_bytes": peak, "repeats": repeats}


def _measure(
    kernel: str,
    method: str,
    h: int,
    w: int,
    device: str,
    repeats: int,
    threads: int,
    processes: int,
) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    args = [kernel, method, str(h), str(w), device, str(repeats), str(threads)]
    cmd = [sys.executable, __file__, "--worker", *args]
    runs = []
    for _ in range(processes):
        out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {
        "median_s": statistics.median(r["median_s"] for r in runs),
        "peak_extra_bytes": int(statistics.median(r["peak_extra_bytes"] for r in runs)),
        "repeats": repeats,
        "per_process_median_s": [r["median_s"] for r in runs],
    }


def _machine(device: str) -> dict:
    import torch

    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        if names:
            info["cpu_model"] = names[0]
    except OSError:
        pass
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _table(rows: list[dict], device: str) -> str:
    lines = [
        "| kernel | shape | method | time fwd+bwd (ms) | peak extra memory (MiB) | time vs maskd | memory vs maskd |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    del device
    by_key = {(r["kernel"], r["shape"], r["method"]): r for r in rows}
    for r in rows:
        ours = by_key[(r["kernel"], r["shape"], "maskd")]
        tr = r["median_s"] / ours["median_s"]
        mr = r["peak_extra_bytes"] / max(ours["peak_extra_bytes"], 1)
        lines.append(
            f"| {r['kernel']} | {r['shape']} | {r['method']} | {r['median_s'] * 1e3:.2f} | "
            f"{r['peak_extra_bytes'] / 2**20:.1f} | {tr:.2f}x | {mr:.2f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        kernel, method, h, w, device, repeats, threads = sys.argv[2:9]
        res = _worker(kernel, method, int(h), int(w), device, int(repeats), int(threads))
        print(json.dumps(res))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--processes", type=int, default=3, help="subprocesses per measurement")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads per measurement (0: default)"
    )
    parser.add_argument("--quick", action="store_true", help="small shape only (a smoke run)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    shapes = SHAPES[-1:] if args.quick else SHAPES
    rows = []
    for kernel, methods in KERNELS.items():
        for name, h, w in shapes:
            for method in methods:
                # The literal forms are slow at the largest maps; fewer repeats keep the run short.
                reps = (
                    max(2, args.repeats // 2)
                    if method == "literal" and h * w > 10_000
                    else args.repeats
                )
                res = _measure(
                    kernel, method, h, w, args.device, reps, args.threads, args.processes
                )
                row = {
                    "kernel": kernel,
                    "shape": name,
                    "N": N,
                    "C": C,
                    "T": T,
                    "H": h,
                    "W": w,
                    "method": method,
                    **res,
                }
                rows.append(row)
                print(
                    f"{kernel:14s} {name:12s} {method:11s} {res['median_s'] * 1e3:9.2f} ms "
                    f"{res['peak_extra_bytes'] / 2**20:9.1f} MiB",
                    flush=True,
                )
    report = {
        "benchmark": "loss_kernel",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": args.device,
        "machine": {**_machine(args.device), "torch_threads": args.threads or "default"},
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"loss_kernel_{args.device}" + ("_quick" if args.quick else "")
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    md = f"Machine: {report['machine']}\n\nCommand: `{report['command']}`\n\n{_table(rows, args.device)}\n"
    (args.out / f"{stem}.md").write_text(md)
    print(f"wrote {args.out / (stem + '.json')}")


if __name__ == "__main__":
    main()
