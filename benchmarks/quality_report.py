"""The quality benchmark's reports: per-seed statistics, MasKD paired with each other row,
the markdown table and the plot, and the header every result file starts with (the
command, the date and the machine). ``quality.py`` trains the cells; this module only reads
and writes what they measured, so ``--rerender`` needs nothing but a report's JSON."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cpu_info import cpu_model


def stats(values: list[float]) -> tuple[float, float]:
    """Mean and sample std; both NaN where a value is (a diverged cell's score)."""
    if any(v != v for v in values):  # statistics.stdev raises on NaN instead of returning it
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def pairings(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """What a report derives from its rows' per-seed scores (also on --rerender)."""
    return {
        "maskd_vs_peers": versus_peers(rows),
        "maskd_vs_ablations": versus_peers(rows, ablations=True),
    }


def versus_peers(rows: list[dict[str, Any]], ablations: bool = False) -> dict[str, Any]:
    """MasKD's paired (same seed) test difference to each peer row (the user's question), or
    with ``ablations`` to each ablation row (what each part of the method adds)."""
    by_name = {row["row"]: row for row in rows}
    if "maskd" not in by_name:
        return {}
    ours = by_name["maskd"]["test"]
    out = {}
    for row in rows:
        if row["ablation"] != ablations or row["row"] in ("student", "maskd"):
            continue
        diffs = [a - b for a, b in zip(ours, row["test"], strict=True)]
        mean, std = stats(diffs)
        out[row["row"]] = {
            "label": row["label"],
            "diffs": diffs,
            "mean": mean,
            "std": std,
            "within_noise": within_noise(diffs),
            "ahead_in": sum(d > 0 for d in diffs),
            "diverged": any(d != d for d in diffs),  # NaN: a seed of either row diverged
        }
    return out


T_975 = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571}  # Student's t, 0.975, n - 1 dof


def within_noise(diffs: list[float]) -> bool:
    """Whether the 95 % t-interval of the mean paired difference contains 0."""
    n = len(diffs)
    if n < 2:
        return True
    mean, std = stats(diffs)
    return abs(mean) <= T_975.get(n, 2.0) * std / n**0.5


SCORE_NAMES = {"map": "AP", "miou": "mIoU"}


def score_name(report: dict[str, Any]) -> str:
    """``AP`` or ``mIoU``, from the report's ``metric`` (``"test map"``, ``"val miou"``)."""
    return SCORE_NAMES[report["metric"].split()[-1]]


def tuning_md(r: dict[str, Any]) -> str:
    lines = ["| method | grid centre (×1) | validation score per weight tried | chosen |"]
    lines.append("|---|---:|---|---:|")
    for m, v in r["methods"].items():
        tried = ", ".join(
            f"{k}: " + ("diverged" if score != score else f"{100 * score:.1f}")
            for k, score in sorted(v["val"].items(), key=lambda kv: float(kv[0]))
        )
        chosen = "none" if v["chosen"] is None else f"{v['chosen']:g}"
        lines.append(f"| {m} | {v['default']:g} | {tried} | {chosen} |")
    return (
        f"Machine: {r['machine']}\n\nCommand: `{r['command']}`\n\nDate: {r['date']}\n\n"
        f"Validation {score_name(r)} (percent) per loss weight, "
        f"{r['protocol']}:\n\n" + "\n".join(lines) + "\n"
    )


def table_md(r: dict[str, Any]) -> str:
    name = score_name(r)
    lines = [
        f"| row | weight | test {name}, mean ± std | per seed | Δ to student alone (paired) "
        f"| gap closed | validation {name}, mean |",
        "|---|---:|---:|---|---:|---:|---:|",
        f"| teacher ({r['teacher']['model']}) | | {r['teacher']['test']:.1f} | | | "
        f"| {r['teacher']['val']:.1f} |",
    ]
    for row in r["rows"]:
        seeds = ", ".join(f"{v:.1f}" for v in row["test"])
        weight = "" if row["weight"] is None else f"{row['weight']:g}"
        if row["row"] == "student":
            delta, closed = "", ""
        elif row["errors"]:
            delta, closed = f"diverged in {len(row['errors'])} of {len(row['test'])} seeds", ""
        else:
            noise = " (within noise)" if within_noise(row["diff_to_student"]) else ""
            delta = f"{row['diff_mean']:+.1f} ± {row['diff_std']:.1f}{noise}"
            closed = f"{100 * row['gap_closed']:.0f} %" if row["gap_closed"] is not None else ""
        lines.append(
            f"| {row['label']} | {weight} | {row['mean']:.1f} ± {row['std']:.1f} | {seeds} "
            f"| {delta} | {closed} | {statistics.fmean(row['val']):.1f} |"
        )
    d = r["data"]
    return (
        f"Machine: {r['machine']}\n\nCommand: `{r['command']}`\n\nDate: {r['date']}\n\n"
        f"Data: synthetic, {d.get('difficulty', 'easy')} setting, {d['size']} px"
        + (f", drawn with seed {d['seed']}" if d.get("seed") else "")
        + "; "
        f"{d['train']} train / {d['val']} val / {d['test']} test images. Student {r['student_model']}, "
        + (f"{r['student_steps']} steps, " if r.get("student_steps") else "")
        + (
            f"learning rate warmed up over {r['warmup_steps']} steps, "
            if r.get("warmup_steps")
            else ""
        )
        + (f"precision {r['precision']}, " if r.get("precision") else "")
        + f"seeds {r['seeds']}. "
        + (f"Weights: those chosen in {r['weights_from']}. " if r.get("weights_from") else "")
        + (
            f"Every distilled row distils FPN levels {r['levels']} only. "
            if r.get("levels")
            else ""
        )
        + f"Metric: {r['metric']} (percent). Δ is the mean ± std over seeds of the paired "
        'difference (same seed) to the student alone; "within noise": its two-sided 95 % '
        "t-interval contains 0 (always, with one seed). "
        "Gap closed = (row mean − student mean) / (teacher − student mean).\n\n"
        + "\n".join(lines)
        + "\n"
        + versus_md(r.get("maskd_vs_peers"))
        + versus_md(r.get("maskd_vs_ablations"), "ablation")
        + _inputs_md(r.get("inputs"))
    )


def versus_md(
    versus: dict[str, dict[str, Any]] | None, other: str = "peer", unit: str = "seed"
) -> str:
    """MasKD against each ``other`` row, paired by ``unit`` (a seed, or a draw of the data)."""
    if not versus:
        return ""
    lines = [
        f"\nMasKD against each {other}, test, paired by {unit} (MasKD − {other}):\n",
        f"| {other} | per {unit} | mean ± std | MasKD ahead in | verdict |",
        "|---|---|---:|---:|---|",
    ]
    for v in versus.values():
        n = len(v["diffs"])
        each = ", ".join(f"{d:+.1f}" for d in v["diffs"])
        lines.append(
            f"| {v['label']} | {each} | {v['mean']:+.1f} ± {v['std']:.1f} "
            f"| {v['ahead_in']} of {n} {unit}s | {_verdict(v)} |"
        )
    return "\n".join(lines) + "\n"


def _verdict(v: dict[str, Any]) -> str:
    """One paired comparison in words: ahead / behind outside noise, or within it."""
    if v["diverged"]:
        return "a seed diverged"
    if v["within_noise"]:
        return "within noise"
    return "ahead" if v["mean"] > 0 else "behind"


def _drawn(r: dict[str, Any]) -> str:
    """The data seed, where a report was made on another draw than seed 0's."""
    seed = r["data"].get("seed")
    return f", data seed {seed}" if seed else ""


def summary_md(paths: list[Path], root: Path) -> str:
    """One line per table report (``paths``, JSON): every main row's test mean ± std, and
    MasKD against the peer with the best mean, paired by seed. Links are relative to
    ``root``."""
    reports = [json.loads(p.read_text()) for p in paths]
    columns: dict[str, str] = {}  # row name -> label, in the order the reports give them
    for r in reports:
        for row in r["rows"]:
            if not row["ablation"] and row["row"] not in ("student", "maskd"):
                columns.setdefault(row["row"], row["label"])
    columns = {"student": "student alone", **columns, "maskd": "MasKD"}
    lines = [
        "| regime: test score | teacher → student | seeds | teacher | "
        + " | ".join(columns.values())
        + " | MasKD − best peer (paired) |",
        "|---|---|---:|---:|" + "---:|" * len(columns) + "---|",
    ]
    for path, r in zip(paths, reports, strict=True):
        rows = {row["row"]: row for row in r["rows"] if not row["ablation"]}
        cells = [f"{rows[c]['mean']:.1f} ± {rows[c]['std']:.1f}" if c in rows else "–"
                 for c in columns]  # fmt: skip
        peers = [c for c in rows if c not in ("student", "maskd")]
        best = max(peers, key=lambda c: rows[c]["mean"])
        v = r["maskd_vs_peers"][best]
        versus = (f"{v['mean']:+.1f} ± {v['std']:.1f} vs {v['label']}, ahead in "
                  f"{v['ahead_in']} of {len(v['diffs'])}: {_verdict(v)}")  # fmt: skip
        link = path.with_suffix(".md").resolve().relative_to(root.resolve())
        lines.append(
            f"| [{r['task']}, {r['data']['size']} px{_drawn(r)}]({link.as_posix()}): "
            f"{score_name(r)} "
            f"| {r['teacher']['model']} → {r['student_model']} | {len(r['seeds'])} "
            f"| {r['teacher']['test']:.1f} | " + " | ".join(cells) + f" | {versus} |"
        )
    return "\n".join(lines) + "\n"


def _inputs_md(inputs: dict[str, Any] | None) -> str:
    if not inputs:
        return ""
    prints = ", ".join(f"{k} {v}" for k, v in sorted(inputs["fingerprints"].items()))
    line = f"\nInputs every fingerprinted cell shares (SHA-256, first 16 hex): {prints or 'none'}."
    if inputs["cells_without_fingerprints"]:
        line += (f" {len(inputs['cells_without_fingerprints'])} cells were kept from before "
                 "fingerprints were recorded.")  # fmt: skip
    return line + "\n"


def plot(r: dict[str, Any], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = r["rows"]
    fig = Figure(figsize=(1.0 + 0.8 * len(rows), 3.6), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    xs = range(len(rows))
    ax.bar(xs, [row["mean"] for row in rows], color=["#999" if row["ablation"] else "#4a7ebb"
                                                      for row in rows])  # fmt: skip
    for x, row in zip(xs, rows, strict=True):
        ax.plot([x] * len(row["test"]), row["test"], "k.", ms=5)
    ax.axhline(r["teacher"]["test"], color="#c44", lw=1, ls="--", label="teacher")
    base = next(row["mean"] for row in rows if row["row"] == "student")
    ax.axhline(base, color="#444", lw=1, ls=":", label="student alone")
    lo = min(min(row["test"]) for row in rows)
    hi = max(r["teacher"]["test"], *(max(row["test"]) for row in rows))  # students may pass it
    ax.set_ylim(max(0.0, lo - 5), hi + 3)
    ax.set_xticks(list(xs), [row["row"] for row in rows], rotation=35, ha="right", fontsize=8)
    ax.set_ylabel(f"test {score_name(r)} (%)")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)


# ---- helpers --------------------------------------------------------------------------------
def header(benchmark: str, task: str, accelerator: str) -> dict[str, Any]:
    """What every result file starts with: which benchmark, the command, when, where."""
    return {
        "benchmark": benchmark,
        "task": task,
        "command": _command(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(accelerator),
    }


def _command() -> str:
    return " ".join(["python", *sys.argv])


def machine(accelerator: str) -> dict[str, Any]:
    import torch

    info = {"platform": platform.platform(), "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads_per_cell": 1}  # fmt: skip
    info["cpu"] = cpu_model()  # CPU kernels (and so the floats) depend on the instruction set
    if accelerator == "gpu" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def write(out: Path, stem: str, report: dict[str, Any], md: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / f"{stem}.md").write_text(md)
    print(md, flush=True)


def rerender(path: Path) -> None:
    """Write ``path``'s .md and .png again from the JSON report, with what is derived from
    the per-seed values (the MasKD-versus-peer pairing) computed by this version."""
    report = json.loads(path.read_text())
    if report.get("benchmark") != "quality" or "rows" not in report:
        raise SystemExit(f"{path}: not a quality table report (no 'rows')")
    report.update(pairings(report["rows"]))
    path.write_text(json.dumps(report, indent=1) + "\n")
    path.with_suffix(".md").write_text(table_md(report))
    plot(report, path.with_suffix(".png"))
