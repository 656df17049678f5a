"""The quality benchmark's learning-rate warm-up, chosen on the validation split.

Trains the student alone (no distillation term, so the choice favours no method) for
``--seeds`` seeds at each warm-up length in ``--warmups`` and chooses the one with the
highest mean validation score (the shorter one on a tie). Cells are ``quality.py``'s
``--warmup-steps`` cells of the task (``student_warmup<N>_s<seed>``); the task's own warm-up
(its ``student.yaml``) is the table's student cells, already trained there. The test split is
evaluated, as for every cell, and never read here. Each cell's early-loss peak ratio
(``quality_spikes.py``) is reported beside its score, and not used to choose.

    python benchmarks/quality_warmup.py --task detection_clutter --warmups 50 100 150 200

Writes ``quality_<task>_warmup_choice_<device>.{json,md}``. A task whose recipe takes the
chosen warm-up (e.g. ``detection_clutter_warmup``) names it in its configs.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from maskd.config_files import load_config
from quality import CONFIGS, METRIC, RESULTS, ROWS, TASKS, Plan, run_cells
from quality_report import header, write
from quality_spikes import cell_curve, peak_ratio

STUDENT = next(r for r in ROWS if r.method is None)
SEEDS = 2
WINDOW = 150  # quality_spikes.py's window


def plans(task: str, warmups: list[int], args: argparse.Namespace) -> dict[int, Plan]:
    """One plan per warm-up: the task's own warm-up is its table's (no suffix)."""
    default = load_config(CONFIGS / task / "student.yaml")["optim"]["warmup_steps"]
    return {n: Plan(task, _args(args, None if n == default else n)) for n in warmups}


def _args(args: argparse.Namespace, warmup: int | None) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), "warmup_steps": warmup})


def _ratio(plan: Plan, name: str) -> float | None:
    """The cell's early-loss peak ratio; None where its log is gone or too short."""
    try:
        return peak_ratio(cell_curve(plan, name), WINDOW)
    except (FileNotFoundError, ValueError):
        return None


def choose(scores: dict[int, list[float]]) -> int | None:
    """The warm-up with the highest mean score (NaN: a diverged cell, never chosen); the
    shorter on a tie."""
    means = {n: statistics.fmean(v) for n, v in scores.items() if all(x == x for x in v)}
    if not means:
        return None
    return max(sorted(means), key=lambda n: (means[n], -n))


def run(task: str, args: argparse.Namespace) -> dict[str, Any]:
    by_warmup = plans(task, args.warmups, args)
    first = next(iter(by_warmup.values()))
    cells = [first.data_cell()]
    for plan in by_warmup.values():
        for seed in range(args.seeds):
            name = plan.cell(STUDENT, None, seed)
            cells.append(plan.student_cell(STUDENT, seed, None, name, ("val", "test")))
    run_cells(cells, first.work, args.workers, first.kept)
    metric = METRIC[first.kind]
    rows: dict[str, Any] = {}
    for n, plan in by_warmup.items():
        val, ratio = [], []
        for seed in range(args.seeds):
            name = plan.cell(STUDENT, None, seed)
            result = plan.read(name)
            val.append(math.nan if "error" in result else float(result["val"][metric]))
            ratio.append(_ratio(plan, name))
        rows[str(n)] = {"cells": [plan.cell(STUDENT, None, s) for s in range(args.seeds)],
                        "val": val, "peak_ratio": ratio}  # fmt: skip
    chosen = choose({int(n): v["val"] for n, v in rows.items()})
    report = {
        **header("quality_warmup", task, args.accelerator),
        "metric": f"val {metric}",
        "protocol": (
            f"the student alone, seeds 0-{args.seeds - 1}, validation split; the warm-up "
            "with the highest mean (the shorter on a tie)"
        ),
        "warmups": rows,
        "chosen": chosen,
    }
    stem = f"quality_{task}_warmup_choice_{args.accelerator}"
    write(args.out, stem, report, choice_md(report))
    return report


def choice_md(r: dict[str, Any]) -> str:
    """The choice as markdown: every warm-up's per-seed score, mean and peak ratio."""
    lines = [
        "| warm-up steps | validation score per seed | mean | early-loss peak ratio per seed |",
        "|---:|---|---:|---|",
    ]
    for n, v in r["warmups"].items():
        seeds = ", ".join("diverged" if x != x else f"{100 * x:.1f}" for x in v["val"])
        mean = statistics.fmean(v["val"])
        ratios = ", ".join("n/a" if x is None else f"{x:.2f}" for x in v["peak_ratio"])
        mark = " (chosen)" if r["chosen"] is not None and int(n) == r["chosen"] else ""
        lines.append(f"| {n}{mark} | {seeds} | {100 * mean:.1f} | {ratios} |")
    return (
        f"Machine: {r['machine']}\n\nCommand: `{r['command']}`\n\nDate: {r['date']}\n\n"
        f"Learning-rate warm-up, {r['protocol']}. Score: {r['metric']} (percent). The peak "
        f"ratio (largest classification loss in the first {WINDOW} steps over the first "
        "logged value, quality_spikes.py) is shown, not used to choose.\n\n"
        + "\n".join(lines)
        + f"\n\nChosen: {r['chosen']} steps.\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=sorted(TASKS), default="detection_clutter")
    parser.add_argument("--warmups", type=int, nargs="+", required=True, metavar="STEPS")
    parser.add_argument("--seeds", type=int, default=SEEDS)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--quick", action="store_true", help="tiny data, a few steps")
    parser.add_argument("--work", type=Path, default=Path("runs/quality"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if len(set(args.warmups)) != len(args.warmups) or min(args.warmups) < 1:
        raise SystemExit(f"--warmups takes distinct step counts >= 1, not {args.warmups}")
    run(args.task, args)


if __name__ == "__main__":
    main()
