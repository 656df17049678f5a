"""One task's table pooled over several draws of its data (``quality.py --pool``).

Each draw (``--data-seed``) has its own images, teacher and tokens, so its table answers
"does MasKD lead here" for one dataset; pooling answers it for the kind of data. The rule:
a row's pooled score is the mean over draws of its test mean over seeds, and MasKD is
paired with each peer by draw (the draw is the unit, its seeds already averaged). The
issue's target is read off the pooled means: MasKD closes at least 30 % of the
teacher-student gap, beats the student alone in every seed of every draw, and leads every
peer's pooled mean. With a teacher bar, a draw whose teacher is less than that many points
above its student alone is reported and left out before pooling (its teacher gave the
student too little to learn from for the draw to say which method transfers more). With
variants (``maskd=maskd_unweighted``: a main row's other setting, an ablation row of the
tables), each is chosen as the loss weights were, on the validation split of data seed 0's
table, and the chosen setting stands for its method in every draw.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from quality_report import header, score_name, stats, versus_md, versus_peers

GAP_TARGET = 0.30
TEACHER_BAR = 5.0  # a regime's teacher beats the student alone by this much (points)


def _accelerator(report: dict[str, Any]) -> str:
    return "gpu" if "gpu" in report["machine"] else "cpu"


def draw_seed(report: dict[str, Any]) -> int:
    """The data seed of a table report's draw (0: the first draw, whose reports predate
    the field)."""
    return int(report["data"].get("seed", 0))


def check_poolable(reports: list[dict[str, Any]], paths: list[Path]) -> None:
    """Raise ``SystemExit`` naming the file unless the reports are tables of one task, one
    metric, seeds and main rows (the student alone and MasKD among them), on one kind of
    device, each of another draw."""
    if len(reports) < 2:
        raise SystemExit("--pool needs the table reports of at least two draws")
    first = reports[0]
    seen: dict[int, Path] = {}
    for path, r in zip(paths, reports, strict=True):
        if r.get("benchmark") != "quality" or "rows" not in r:
            raise SystemExit(f"{path}: not a quality table report (no 'rows')")
        for key in ("task", "metric", "seeds", "student_steps", "warmup_steps", "levels"):
            if r.get(key) != first.get(key):
                raise SystemExit(
                    f"{path}: its {key} is {r.get(key)!r}, {paths[0]}'s is {first.get(key)!r}"
                )
        rows = _main_rows(r).keys()
        if not {"student", "maskd"} <= rows:
            raise SystemExit(f"{path}: a table without the student alone or MasKD")
        if rows != _main_rows(first).keys():
            raise SystemExit(
                f"{path}: main rows {sorted(rows)}, {paths[0]}: {sorted(_main_rows(first))}"
            )
        if _accelerator(r) != _accelerator(first):
            raise SystemExit(f"{path}: made on {_accelerator(r)}, {paths[0]} on "
                             f"{_accelerator(first)}")  # fmt: skip
        draw = draw_seed(r)
        if draw in seen:
            raise SystemExit(f"{path} and {seen[draw]} are both of data seed {draw}")
        seen[draw] = path


def _main_rows(
    report: dict[str, Any], chosen: dict[str, str] | None = None
) -> dict[str, dict[str, Any]]:
    """The main rows by name, a chosen variant's row standing under its main row's name."""
    rows = {row["row"]: row for row in report["rows"]}
    main = {name: row for name, row in rows.items() if not row["ablation"]}
    for name, variant in (chosen or {}).items():
        main[name] = {**rows[variant], "row": name}
    return main


def choose_variants(
    reports: list[dict[str, Any]], paths: list[Path], variants: dict[str, str]
) -> dict[str, dict[str, Any]]:
    """For each ``row: variant``, the validation means (over seeds) of both on data seed 0's
    table and the one chosen (the variant only if higher)."""
    tuning = [(p, r) for p, r in zip(paths, reports, strict=True) if draw_seed(r) == 0]
    if not tuning:
        raise SystemExit("--variant is chosen on data seed 0's validation (the draw that chose "
                         "the weights): pool its table too")  # fmt: skip
    path, rows = tuning[0][0], {row["row"]: row for row in tuning[0][1]["rows"]}
    choices = {}
    for name, variant in variants.items():
        if name not in rows or rows[name]["ablation"]:
            raise SystemExit(f"--variant {name}={variant}: {name} is not a main row of {path}")
        if variant not in rows or not rows[variant]["ablation"]:
            raise SystemExit(f"--variant {name}={variant}: {path} has no ablation row {variant}")
        val = {n: stats(rows[n]["val"])[0] for n in (name, variant)}
        chosen = variant if val[variant] > val[name] else name
        choices[name] = {"variant": variant, "label": rows[variant]["label"], "val": val,
                         "chosen": chosen}  # fmt: skip
    return choices


def pool(
    paths: list[Path], teacher_bar: float | None = None, variants: dict[str, str] | None = None
) -> dict[str, Any]:
    """The pooled report of the table reports at ``paths`` (JSON), in draw order; with
    ``teacher_bar``, the draws whose teacher is less than that many points above their
    student alone are listed under ``left_out`` and not pooled; with ``variants``
    (``{row: variant row}``), each is chosen on data seed 0's validation
    (:func:`choose_variants`)."""
    reports = [json.loads(p.read_text()) for p in paths]
    check_poolable(reports, paths)
    order = sorted(range(len(reports)), key=lambda i: draw_seed(reports[i]))
    reports, paths = [reports[i] for i in order], [paths[i] for i in order]
    choices = choose_variants(reports, paths, variants) if variants else {}
    chosen = {n: c["chosen"] for n, c in choices.items() if c["chosen"] != n}
    students = [_main_rows(r)["student"]["mean"] for r in reports]  # it has no variant
    gaps = [r["teacher"]["test"] - m for r, m in zip(reports, students, strict=True)]
    weak = [teacher_bar is not None and g < teacher_bar for g in gaps]
    left_out = [
        {"data_seed": draw_seed(r), "report": p.name, "teacher": r["teacher"]["test"],
         "student": m, "teacher_gap": g}
        for p, r, m, g, w in zip(paths, reports, students, gaps, weak, strict=True) if w
    ]  # fmt: skip
    reports = [r for r, w in zip(reports, weak, strict=True) if not w]
    paths = [p for p, w in zip(paths, weak, strict=True) if not w]
    gaps = [g for g, w in zip(gaps, weak, strict=True) if not w]
    if len(reports) < 2:
        raise SystemExit(
            f"--teacher-bar {teacher_bar:g} leaves {len(reports)} draw(s) to pool; left out: "
            + ", ".join(f"data seed {d['data_seed']} ({d['teacher_gap']:+.1f})" for d in left_out)
        )
    for name, variant in chosen.items():  # only the pooled draws need it
        for p, r in zip(paths, reports, strict=True):
            if variant not in {row["row"] for row in r["rows"]}:
                raise SystemExit(f"{p}: no row {variant}, chosen for {name} on data "
                                 f"seed 0's validation; run it: quality.py --rows ... "
                                 f"{variant}")  # fmt: skip
    mains = [_main_rows(r, chosen) for r in reports]
    accelerator = _accelerator(reports[0])
    rows = []
    for name in mains[0]:
        per_draw = [main[name] for main in mains]
        means = [row["mean"] for row in per_draw]
        mean, std = stats(means)
        rows.append({"row": name, "label": per_draw[0]["label"], "ablation": False,
                     "weights": [row["weight"] for row in per_draw],
                     "test": means, "mean": mean, "std": std})  # fmt: skip
    teacher = [r["teacher"]["test"] for r in reports]
    by_name = {row["row"]: row for row in rows}
    student, ours = by_name["student"]["mean"], by_name["maskd"]["mean"]
    t_mean, t_std = stats(teacher)
    gap = t_mean - student
    rule = ("a row's pooled score is the mean over draws of its test mean over seeds; "
            "MasKD is paired with each peer by draw")  # fmt: skip
    if choices:
        rule += ("; a variant stands for its row in every draw if its validation mean on data "
                 "seed 0 is higher")  # fmt: skip
    if teacher_bar is not None:
        rule += (f"; a draw whose teacher is less than {teacher_bar:g} points above its "
                 "student alone is left out")  # fmt: skip
    versus = versus_peers(rows)  # MasKD − peer, paired by draw ("test" holds the draw means)
    beats = [main["maskd"]["beats_student_every_seed"] for main in mains]
    gap_closed = (ours - student) / gap if gap else None
    leads = bool(versus) and all(v["mean"] > 0 for v in versus.values())  # False with NaN
    closes = gap_closed is not None and gap_closed >= GAP_TARGET
    return {
        **header("quality_pooled", reports[0]["task"], accelerator),
        "accelerator": accelerator,
        "metric": reports[0]["metric"],
        "seeds": reports[0]["seeds"],
        "rule": rule,
        "teacher_bar": teacher_bar,
        "left_out": left_out,
        "variants": choices,
        "draws": [
            {
                "data_seed": draw_seed(r),
                "report": p.name,
                "teacher": r["teacher"]["test"],
                "teacher_gap": g,
                "data": r["data"],
                "date": r["date"],
                "maskd_gap_closed": main["maskd"]["gap_closed"],
                "maskd_beats_student_every_seed": b,
            }
            for p, r, main, b, g in zip(paths, reports, mains, beats, gaps, strict=True)
        ],
        "teacher": {"test": teacher, "mean": t_mean, "std": t_std},
        "rows": rows,
        "maskd_vs_peers": versus,
        "target": {
            "gap_closed": gap_closed,
            "closes_30_percent": closes,
            "beats_student_every_seed_of_every_draw": all(beats),
            "leads_every_peer": leads,
            "met": closes and all(beats) and leads,
        },
    }


def pooled_md(r: dict[str, Any]) -> str:
    """The pooled report as markdown: a column per draw, the pooled mean, the pairings."""
    name = score_name(r)
    draws = r["draws"]
    head = " | ".join(f"data seed {d['data_seed']}" for d in draws)
    lines = [
        f"| row | {head} | pooled: mean ± std over draws |",
        "|---|" + "---:|" * len(draws) + "---:|",
        "| teacher | "
        + " | ".join(f"{v:.1f}" for v in r["teacher"]["test"])
        + f" | {r['teacher']['mean']:.1f} ± {r['teacher']['std']:.1f} |",
    ]
    for row in r["rows"]:
        lines.append(f"| {row['label']} | " + " | ".join(f"{v:.1f}" for v in row["test"])
                     + f" | {row['mean']:.1f} ± {row['std']:.1f} |")  # fmt: skip
    t = r["target"]
    closed = "–" if t["gap_closed"] is None else f"{100 * t['gap_closed']:.0f} %"
    sources = ", ".join(
        f"[data seed {d['data_seed']}]({Path(d['report']).with_suffix('.md')})" for d in draws
    )
    verdict = "met" if t["met"] else "not met"
    weak = [f"data seed {d['data_seed']} ({d['teacher_gap']:+.1f})" for d in draws
            if d["teacher_gap"] < TEACHER_BAR]  # fmt: skip
    bar = (f"Draws whose teacher is less than {TEACHER_BAR:g} points above the student alone "
           f"(the regime's bar), pooled by the rule as every draw: {', '.join(weak)}.\n"
           if weak else "")  # fmt: skip
    for row, c in r.get("variants", {}).items():
        v = c["val"]
        bar += (f"Variant for {row}: {c['label']} ({c['variant']}), validation on data seed 0 "
                f"{v[c['variant']]:.1f} against {v[row]:.1f}: "
                + (f"chosen, it is the {row} row of every draw above.\n"
                   if c["chosen"] != row else "not chosen.\n"))  # fmt: skip
    if r.get("left_out"):
        bar += (f"Left out by the rule (the teacher less than {r['teacher_bar']:g} points above "
               "the student alone): " + "; ".join(
                   f"[data seed {d['data_seed']}]({Path(d['report']).with_suffix('.md')}), "
                   f"teacher {d['teacher']:.1f}, student alone {d['student']:.1f} "
                   f"({d['teacher_gap']:+.1f})" for d in r["left_out"]) + ".\n")  # fmt: skip
    return (
        f"Machine: {r['machine']}\n\nCommand: `{r['command']}`\n\nDate: {r['date']}\n\n"
        f"Task {r['task']}, {len(draws)} draws of its data"
        + (f" ({len(r['left_out'])} more left out, below)" if r.get("left_out") else "")
        + f", each a table of seeds {r['seeds']} ({sources}). Every draw has its own images, "
        f"teacher and tokens. Cells: test {name} (percent), each draw's mean over seeds. "
        f"Rule, fixed before the draws were compared: {r['rule']}.\n\n"
        + "\n".join(lines)
        + "\n"
        + versus_md(r["maskd_vs_peers"], unit="draw")
        + f"\nTarget ({verdict}): MasKD closes {closed} of the pooled teacher-student gap "
        f"(needs {100 * GAP_TARGET:.0f} %); beats the student alone in every seed of every draw: "
        f"{'yes' if t['beats_student_every_seed_of_every_draw'] else 'no'}; its pooled mean "
        f"leads every peer's: {'yes' if t['leads_every_peer'] else 'no'}.\n"
        + (f"\n{bar}" if bar else "")
    )
