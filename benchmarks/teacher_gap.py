"""Does the synthetic dataset separate a large teacher from a small student?

Writes a synthetic dataset with ``maskd data synth``, trains every listed model from scratch
with one recipe (a ``maskd train`` config; only the model name changes), validates every
``--eval-every`` steps and writes the curves and final scores to
``benchmarks/results/teacher_gap_<task>_<device>.json`` and ``.md``.

    python benchmarks/teacher_gap.py --task segmentation --size 64 --steps 1500 \\
        --models deeplabv3_resnet50 deeplabv3_resnet18 lraspp_mobilenet_v3_large
    python benchmarks/teacher_gap.py --task detection --accelerator gpu --steps 20000 \\
        --size 256 --train 20000 --models fcos_resnet50_fpn fcos_resnet18_fpn

Every model sees the same images in the same order (same seed) with the same optimizer,
schedule and step count. Each run goes through the ``maskd`` command line, so what is
measured is exactly what a user gets.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality_logs import read_log

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
# The recipe each task's models share: the demo's plain-student config.
RECIPES = {
    "segmentation": ROOT / "configs" / "demo" / "segmentation" / "student.yaml",
    "detection": ROOT / "configs" / "demo" / "detection" / "student.yaml",
}
METRIC = {"segmentation": "val/miou", "detection": "val/map"}


def _maskd(*args: str, log: Path) -> None:
    cmd = [sys.executable, "-m", "maskd.cli", *args]
    with log.open("a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT)


def _curve(run: Path, metric: str) -> list[tuple[int, float]]:
    """``(step, value)`` of every validation the run logged, from Lightning's CSV log."""
    log = read_log(run)
    if not log:
        raise FileNotFoundError(f"no CSV log under {run}")
    return log.get(metric, [])


def _machine(accelerator: str) -> dict:
    info = {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
    }
    import torch

    info["torch"] = torch.__version__
    info["torch_threads"] = torch.get_num_threads()
    if accelerator == "gpu" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=sorted(RECIPES), default="segmentation")
    parser.add_argument("--models", nargs="+", required=True)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--train", type=int, default=2000, help="training images")
    parser.add_argument("--val", type=int, default=200, help="validation images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=None, help="override the recipe's lr")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--work", type=Path, default=Path("runs/teacher_gap"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    work = args.work / args.task
    work.mkdir(parents=True, exist_ok=True)
    log = work / "log.txt"
    data = work / "data"
    if not (data / "done.txt").is_file():
        _maskd(
            "data", "synth", "--out", str(data), "--task", args.task, "--train", str(args.train),
            "--val", str(args.val), "--size", str(args.size), "--seed", str(args.seed),
            "--overwrite", "true", log=log,
        )  # fmt: skip
        (data / "done.txt").write_text("ok\n")

    rows = []
    for name in args.models:
        run = work / name
        started = time.perf_counter()
        overrides = [
            "--model.name", name, "--data.root", str(data), "--run.out", str(run),
            "--trainer.max_steps", str(args.steps),
            "--trainer.val_every_n_steps", str(args.eval_every),
            "--trainer.accelerator", args.accelerator, "--trainer.progress_bar", "false",
            "--data.batch_size", str(args.batch_size), "--run.seed", str(args.seed),
            "--run.validate", "true",
        ]  # fmt: skip
        if args.task == "segmentation":
            overrides += ["--data.size", str(args.size)]
        else:
            overrides += [
                "--model.options",
                json.dumps({"min_size": args.size, "max_size": args.size}),
            ]
        if args.lr is not None:
            overrides += ["--optim.lr", str(args.lr)]
        if not (run / "done.json").is_file():
            _maskd("train", "--config", str(RECIPES[args.task]), *overrides, log=log)
        final = json.loads((run / "metrics.json").read_text())
        rows.append(
            {
                "model": name,
                "final": final,
                "curve": _curve(run, METRIC[args.task]),
                "seconds": round(time.perf_counter() - started, 1),
            }
        )
        print(f"{name:32s} {METRIC[args.task]} = {final[METRIC[args.task]]:.4f}", flush=True)

    report = {
        "benchmark": "teacher_gap",
        "task": args.task,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "recipe": str(RECIPES[args.task].relative_to(ROOT)),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": _machine(args.accelerator),
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"teacher_gap_{args.task}_{args.accelerator}"
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    metric = METRIC[args.task]
    steps = sorted({s for r in rows for s, _ in r["curve"]})
    head = "| model | " + " | ".join(f"step {s}" for s in steps) + " | seconds |"
    lines = [head, "|---|" + "---:|" * (len(steps) + 1)]
    for r in rows:
        by_step = dict(r["curve"])
        cells = [f"{100 * by_step[s]:.1f}" if s in by_step else "" for s in steps]
        lines.append(f"| `{r['model']}` | " + " | ".join(cells) + f" | {r['seconds']:.0f} |")
    md = (
        f"Machine: {report['machine']}\n\nCommand: `{report['command']}`\n\n"
        f"{metric} (percent) on the synthetic validation split during training:\n\n"
        + "\n".join(lines)
        + "\n"
    )
    (args.out / f"{stem}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
