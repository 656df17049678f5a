"""Early loss spikes in the quality benchmark's student cells, beside each cell's test score.

A detector trained from scratch can see its classification loss jump while the learning
rate warms up and just after (FCOS's focal loss: from about 0.7 to 2-4 within tens of
steps), then recover. This reads each table cell's training log (``csv/version_*/
metrics.csv`` under the benchmark's work folder) and measures its *peak ratio*: the largest
logged classification loss in the first ``--window`` steps over its first logged value (a
non-finite loss in the window counts as an infinite ratio). A cell with a ratio of at least
``--threshold`` spiked. Per row it reports how many cells spiked, the test score of the
spiked cells against the same row's other cells on the same draw, and the row's paired gain
over the student alone split by whether the student alone's cell on that seed spiked (how
much of a gain is the distilled row not spiking); with ``--tuning`` also
the seed-0 cells of the validation weight sweep, whose ratio shows how the spike depends on
a term's weight.

    python benchmarks/quality_spikes.py \
        benchmarks/results/quality_detection_clutter{_seeds5,_data1}_cpu.json \
        --tuning benchmarks/results/quality_detection_clutter_tuning_cpu.json --work runs/quality

Writes ``quality_<task>_spikes_cpu.{json,md}`` (``quality_<task>_warmup<N>_spikes_cpu`` for
the reports of a ``--warmup-steps`` diagnostic, ``..._steps<N>_...`` of a ``--student-steps``
one; ``..._data<N>_spikes_cpu`` for one draw
other than data seed 0's). It reads each cell's log in the work folder the cells trained in,
or, where that folder is gone, the losses kept in the cell's result under
``benchmarks/results/quality_cells/`` (a cell kept before results kept its losses, whose
folder is gone, has no ratio: the report counts and lists it, and leaves it out of the
spike counts and splits); ``--rerender SPIKES_JSON`` rewrites a spikes report's rows and .md
from the cells it stored.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from maskd.config_files import load_config
from quality import CONFIGS, RESULTS, ROWS, SEEDS, Plan
from quality_logs import curve
from quality_pool import draw_seed
from quality_report import header, stats, write

ROW = {r.name: r for r in ROWS}

KEY = "train/classification"


def cell_curve(plan: Plan, name: str, key: str = KEY) -> list[tuple[int, float]]:
    """Cell ``name``'s curve of ``key``: its log in the plan's work folder, or the losses
    kept in its result where the folder is gone."""
    try:
        kept = plan.read(name)
    except FileNotFoundError:
        kept = None
    return curve(plan.work / name, key, kept)


def peak_ratio(points: list[tuple[int, float]], window: int) -> float:
    """The largest value logged before step ``window`` over the first value logged; ``inf``
    if a value in the window is not finite (a loss that diverged)."""
    first = points[0][1]
    early = [v for step, v in points if step < window]
    if not math.isfinite(first) or not all(math.isfinite(v) for v in early):
        return math.inf
    if first <= 0:
        raise ValueError(f"first logged value {first} is not positive: no ratio to it")
    return max(early) / first


def _plan(report: dict[str, Any], work: Path, data_seed: int | None = None) -> Plan:
    """quality.py's plan of ``report``'s cells: their work folder, names and report stem
    (the draw's, or ``data_seed``'s; a ``--student-steps`` diagnostic's own cells where the
    report's step count is not the recipe's)."""
    steps = report.get("student_steps")
    recipe = load_config(CONFIGS / report["task"] / "student.yaml")["trainer"]["max_steps"]
    args = argparse.Namespace(
        quick=False, work=work, out=RESULTS, accelerator="cpu",
        student_steps=steps if steps not in (None, recipe) else None,
        warmup_steps=report.get("warmup_steps"),
        data_seed=draw_seed(report) if data_seed is None else data_seed,
    )  # fmt: skip
    return Plan(report["task"], args)


def _ratio(plan: Plan, name: str, window: int) -> float | None:
    """Cell ``name``'s peak ratio; ``None`` if neither its folder nor its kept result has
    its log."""
    try:
        return peak_ratio(cell_curve(plan, name), window)
    except FileNotFoundError as err:
        print(f"no peak ratio: {err}", file=sys.stderr)
        return None


def collect(reports: list[dict[str, Any]], work: Path, window: int) -> list[dict[str, Any]]:
    """One entry per table cell of every report: its draw, row, weight, seed, peak ratio
    (``None`` without a log) and test score (percent, the report's own)."""
    cells = []
    for report in reports:
        plan = _plan(report, work)
        for row in report["rows"]:
            for seed, test in zip(report["seeds"], row["test"], strict=True):
                name = plan.cell(ROW[row["row"]], row["weight"], seed)
                cells.append({
                    "draw": draw_seed(report), "row": row["row"], "label": row["label"],
                    "weight": row["weight"], "seed": seed, "cell": name,
                    "ratio": _ratio(plan, name, window), "test": test,
                })  # fmt: skip
    return cells


def sweep(tuning: dict[str, Any], work: Path, window: int) -> list[dict[str, Any]]:
    """The peak ratio of each seed-0 cell of a validation weight sweep, with its validation
    score (percent)."""
    plan = _plan({"task": tuning["task"], "data": {}}, work)
    out = []
    for method, entry in tuning["methods"].items():
        for weight, val in sorted(entry["val"].items(), key=lambda kv: float(kv[0])):
            name = plan.cell(ROW[method], float(weight), 0)
            out.append({
                "row": method, "weight": float(weight), "chosen": float(weight) == entry["chosen"],
                "ratio": peak_ratio(cell_curve(plan, name), window), "val": 100 * val,
            })  # fmt: skip
    return out


def summarise(
    cells: list[dict[str, Any]], threshold: float, baseline: str = "student"
) -> list[dict[str, Any]]:
    """Per row, in first-seen order: cells, cells spiked, and on every draw where the row has
    both kinds, the mean test score of its spiked cells minus that of its other cells. Every
    other row than ``baseline`` also gets its paired differences to ``baseline`` (same draw,
    same seed), split by whether ``baseline``'s cell spiked: how much of a row's gain comes
    from the seeds on which the student alone spiked. A cell without a ratio (no log) counts
    in ``cells`` and ``no_log`` only, a baseline cell without one pairs with nothing."""
    base = {
        (c["draw"], c["seed"]): c for c in cells if c["row"] == baseline and c["ratio"] is not None
    }
    out = []
    for name in dict.fromkeys(c["row"] for c in cells):
        every = [c for c in cells if c["row"] == name]
        mine = [c for c in every if c["ratio"] is not None]
        diffs = []
        for draw in dict.fromkeys(c["draw"] for c in mine):
            spiked = [c["test"] for c in mine if c["draw"] == draw and c["ratio"] >= threshold]
            other = [c["test"] for c in mine if c["draw"] == draw and c["ratio"] < threshold]
            if spiked and other:
                diffs.append(statistics.fmean(spiked) - statistics.fmean(other))
        split: dict[str, list[float]] = {"over_baseline_spiked": [], "over_baseline_other": []}
        for c in every if name != baseline else []:
            b = base.get((c["draw"], c["seed"]))
            if b is not None:
                key = "over_baseline_spiked" if b["ratio"] >= threshold else "over_baseline_other"
                split[key].append(c["test"] - b["test"])
        out.append({
            "row": name, "label": every[0]["label"], "cells": len(every),
            "no_log": len(every) - len(mine),
            "spiked": sum(c["ratio"] >= threshold for c in mine),
            "median_ratio": statistics.median(c["ratio"] for c in mine) if mine else None,
            "spiked_minus_other": diffs, **split,
        })  # fmt: skip
    return out


def _gain(diffs: list[float]) -> str:
    """``+2.1 ± 0.4 (3)``: mean ± sample std of paired differences and how many; blank if
    none."""
    if not diffs:
        return ""
    mean, std = stats(diffs)
    spread = f" ± {std:.1f}" if len(diffs) > 1 else ""
    return f"{mean:+.1f}{spread} ({len(diffs)})"


def spikes_md(r: dict[str, Any]) -> str:
    """The report's markdown: per row, then the weight sweep, then the spiked cells."""
    lines = [
        f"Peak ratio: the largest classification loss logged in a cell's first {r['window']} "
        f"steps over its first logged value; a cell spiked if it is at least "
        f"{r['threshold']:g}. Draws (data seeds): "
        f"{', '.join(str(d) for d in r['draws'])}. Test scores in percent. The last two "
        "columns: the row's test score minus the student alone's on the same draw and seed, "
        "mean ± std (how many), over the seeds on which the student alone spiked, then over "
        "the others.",
        "",
        "| row | cells | spiked | median peak ratio | test score, spiked − other cells of "
        "the row on the same draw | − student alone, its spiked seeds | − student alone, "
        "its other seeds |",
        "|---|---:|---:|---:|---|---|---|",
    ]
    for s in r["rows"]:
        diffs = s["spiked_minus_other"]
        paired = ", ".join(f"{d:+.1f}" for d in diffs)
        if diffs:
            paired += f" (mean {statistics.fmean(diffs):+.1f}, {len(diffs)} draws)"
        split = [_gain(s.get(k, [])) for k in ("over_baseline_spiked", "over_baseline_other")]
        cells = f"{s['cells']} ({s['no_log']} without a log)" if s.get("no_log") else s["cells"]
        median = "n/a" if s["median_ratio"] is None else f"{s['median_ratio']:.2f}"
        lines.append(f"| {s['label']} | {cells} | {s['spiked']} | "
                     f"{median} | {paired} | {split[0]} | {split[1]} |")  # fmt: skip
    if r["sweep"]:
        lines += [
            "",
            "The validation weight sweep (seed 0, data seed 0):",
            "",
            "| term | weight | peak ratio | validation score |",
            "|---|---:|---:|---:|",
        ]
        for c in r["sweep"]:
            chosen = " (chosen)" if c["chosen"] else ""
            lines.append(f"| {c['row']} | {c['weight']:g}{chosen} | {c['ratio']:.2f} | "
                         f"{c['val']:.1f} |")  # fmt: skip
    lines += ["", "Spiked table cells:", "", "| data seed | row | seed | peak ratio | test |",
              "|---:|---|---:|---:|---:|"]  # fmt: skip
    for c in r["cells"]:
        if c["ratio"] is not None and c["ratio"] >= r["threshold"]:
            lines.append(f"| {c['draw']} | {c['label']} | {c['seed']} | {c['ratio']:.2f} | "
                         f"{c['test']:.1f} |")  # fmt: skip
    no_log = [c for c in r["cells"] if c["ratio"] is None]
    if no_log:
        lines += ["", "Cells without a training log (kept before results kept their losses, "
                  "their folders gone; no ratio): "
                  + ", ".join(f"{c['cell']} (data seed {c['draw']})" for c in no_log) + "."]  # fmt: skip
    return f"Machine: {r['machine']}\n\nCommand: `{r['command']}`\n\n" + "\n".join(lines) + "\n"


def rerender(path: Path) -> None:
    """Write ``path``'s rows and .md again from the spikes report's stored cells (their peak
    ratios and test scores), with what this version derives from them; the logs are not
    needed."""
    report = json.loads(path.read_text())
    if report.get("benchmark") != "quality_spikes" or "cells" not in report:
        raise SystemExit(f"{path}: not a quality_spikes report (no 'cells')")
    report["rows"] = summarise(report["cells"], report["threshold"])
    path.write_text(json.dumps(report, indent=1) + "\n")
    path.with_suffix(".md").write_text(spikes_md(report))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reports", nargs="*", type=Path, help="draws' table reports (JSON)")
    parser.add_argument("--rerender", type=Path, metavar="JSON",
                        help="write a spikes report's rows and .md again from its cells")  # fmt: skip
    parser.add_argument("--tuning", type=Path, help="the task's weight-sweep report (JSON)")
    parser.add_argument("--work", type=Path, default=Path("runs/quality"))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--window", type=int, default=150, help="steps (default: 150)")
    parser.add_argument("--threshold", type=float, default=1.5, help="peak ratio (1.5)")
    args = parser.parse_args()
    if args.rerender:
        return rerender(args.rerender)
    if not args.reports:
        parser.error("give the table reports (JSON), or --rerender a spikes report")
    reports = [json.loads(p.read_text()) for p in args.reports]
    tasks = {r["task"] for r in reports}
    draws = [draw_seed(r) for r in reports]
    warmups = {r.get("warmup_steps") for r in reports}
    if len(tasks) != 1 or len(set(draws)) != len(draws) or len(warmups) != 1:
        raise SystemExit(f"one report per draw of one task and recipe, please: tasks "
                         f"{sorted(tasks)}, data seeds {draws}, "
                         f"warm-ups {sorted(map(str, warmups))}")  # fmt: skip
    if any(r.get("levels") for r in reports):
        raise SystemExit("a --levels diagnostic's cells are not read here: give table reports")
    cells = collect(reports, args.work, args.window)
    task = tasks.pop()
    report = {
        **header("quality_spikes", task, "cpu"),
        "window": args.window,
        "threshold": args.threshold,
        "draws": draws,
        "rows": summarise(cells, args.threshold),
        "sweep": sweep(json.loads(args.tuning.read_text()), args.work, args.window)
        if args.tuning else [],
        "cells": cells,
    }  # fmt: skip
    one = _plan(reports[0], args.work, data_seed=draws[0] if len(draws) == 1 else 0)
    stem = one.report_stem(SEEDS).removesuffix("_cpu") + "_spikes_cpu"  # the table's, + spikes
    write(args.out, stem, report, spikes_md(report))


if __name__ == "__main__":
    main()
