"""The README's Python examples run as written, and every results table in the README and
in docs/results-detection.md shows its report's numbers."""

from __future__ import annotations

import json
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
ROOT = README.parent
RESULTS = ROOT / "benchmarks" / "results"
# the documents whose tables are checked against the reports
RESULT_DOCS = (README, ROOT / "docs" / "results-detection.md")


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_examples_run():
    blocks = _python_blocks()
    assert blocks, "README has no python example"
    for block in blocks:
        namespace: dict = {}
        exec(compile(block, str(README), "exec"), namespace)
        if "loss" in namespace:
            loss = namespace["loss"]
            assert loss.ndim == 0 and loss.item() > 0
            assert namespace["student_feat"].grad is not None


def test_readme_names_the_two_commands():
    text = README.read_text()
    assert "make demo" in text and "make test" in text


def _rows_at(lines: list[str], header: int) -> list[list[str]]:
    """The cells of each row of the markdown table whose header is ``lines[header]``."""
    rows = []
    for line in lines[header + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def _report_plotted_after(lines: list[str], start: int) -> Path:
    """The report (path without suffix) whose plot is the first image after ``lines[start]``
    (a link from docs/ starts with ``../``)."""
    plot = next(ln for ln in lines[start:] if ln.startswith("!["))
    png = re.search(r"\((?:\.\./)?(benchmarks/results/[^)]+)\.png\)", plot).group(1)
    return ROOT / png


def _quality_tables() -> list[tuple[list[list[str]], Path]]:
    """Each quality table (``| row | weight | ...``) of the result documents, with the report
    its plot names (a link from docs/ starts with ``../``)."""
    out = []
    for doc in RESULT_DOCS:
        lines = doc.read_text().splitlines()
        for i, line in enumerate(lines):
            if not line.startswith("| row | weight | test "):
                continue
            rows = _rows_at(lines, i)
            out.append((rows, _report_plotted_after(lines, i + 2 + len(rows))))
    return out


def _table_rows(header: str) -> list[list[str]]:
    """The cells of each row of the result documents' one table whose header line starts
    with ``header``."""
    for doc in RESULT_DOCS:
        lines = doc.read_text().splitlines()
        for i, line in enumerate(lines):
            if line.startswith(header):
                return _rows_at(lines, i)
    raise AssertionError(f"no table starts with {header!r}")


def test_result_docs_images_exist():
    """Every picture a result document shows is a committed file (paths from docs/ go up)."""
    for doc in RESULT_DOCS:
        for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", doc.read_text()):
            assert (doc.parent / link).is_file(), (doc.name, link)


def test_readme_quality_tables_show_the_reports_numbers():
    """Every seed's score and every mean in the README's tables is the report's, row for row
    (matched by the per-seed values, which no two rows share)."""
    tables = _quality_tables()
    assert len(tables) >= 5
    for rows, stem in tables:
        report = json.loads(stem.with_suffix(".json").read_text())
        by_seeds = {", ".join(f"{v:.1f}" for v in r["test"]): r for r in report["rows"]}
        shown = [r for r in rows if r[3]]  # the teacher has no per-seed column
        main = [r for r in report["rows"] if not r["ablation"]]  # ablations: their own table
        assert len(shown) == len(main), stem.name
        for cells in shown:
            row = by_seeds[cells[3]]  # KeyError: a README row the report does not have
            assert cells[2] == f"{row['mean']:.1f} ± {row['std']:.1f}", (stem.name, cells)
            weight = "" if row["weight"] is None else f"{row['weight']:g}"
            assert cells[1] == weight, (stem.name, cells)
        teacher = next(r for r in rows if r[0].startswith("teacher"))
        assert teacher[2] == f"{report['teacher']['test']:.1f}", stem.name


def test_peer_tables_are_the_reports():
    """Each table of MasKD paired by seed with the peers (``| peer | per seed |``) is the one
    printed by the report whose plot follows it, row for row as written."""
    checked = 0
    for doc in RESULT_DOCS:
        lines = doc.read_text().splitlines()
        for i, line in enumerate(lines):
            if not line.startswith("| peer | per seed |"):
                continue
            block = _table_text("\n".join(lines[i:]), "| peer | per seed |")
            report = _report_plotted_after(lines, i)
            assert block in report.with_suffix(".md").read_text(), (doc.name, report.name)
            checked += 1
    assert checked >= 5


def test_readme_128px_sweep_table_is_the_tuning_report():
    """The 128 px sweep table: every weight tried, its validation AP and the weight chosen
    are the tuning report's, method for method."""
    rows = _table_rows("| method | validation AP per weight tried | chosen |")
    tuning = json.loads((RESULTS / "quality_detection_ranges128_tuning_cpu.json").read_text())
    methods = tuning["methods"]
    assert [r[0].lower() for r in rows] == list(methods)
    for label, tried, chosen in rows:
        v = methods[label.lower()]
        want = sorted(v["val"].items(), key=lambda kv: float(kv[0]))
        assert tried == ", ".join(f"{w}: {100 * s:.1f}" for w, s in want), label
        assert chosen == f"{v['chosen']:g}", label


def _table_text(text: str, header: str) -> str:
    """The lines of ``text``'s first markdown table whose header line starts with
    ``header``, as written (no final newline)."""
    lines = [*text.splitlines(), ""]
    start = next(i for i, ln in enumerate(lines) if ln.startswith(header))
    end = next(i for i in range(start, len(lines)) if not lines[i].startswith("|"))
    return "\n".join(lines[start:end])


def _overview() -> tuple[str, list[str]]:
    """The README's overview table under Results, and the report stems it links."""
    block = _table_text(README.read_text(), "| regime: test score |") + "\n"
    return block, re.findall(r"\]\((benchmarks/results/[^)]+)\.md\)", block)


def test_readme_overview_is_the_reports_summary():
    """The overview table under Results is ``quality.py --summary`` of the reports it links,
    character for character: a report that changes fails this until the README follows."""
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from quality_report import summary_md

    block, links = _overview()
    assert len(links) == 22
    paths = [ROOT / f"{link}.json" for link in links]
    assert block == summary_md(paths, ROOT)


def test_readme_ablation_tables_are_the_reports():
    """Each README ablation table (``| ablation row | weight | ...``): every row's scores, its
    validation mean and MasKD's paired difference to it are those of the report named last
    before the table (rows matched by their per-seed scores)."""
    import statistics

    tables = [
        (lines, i)
        for lines in (doc.read_text().splitlines() for doc in RESULT_DOCS)
        for i, ln in enumerate(lines)
        if ln.startswith("| ablation row | weight |")
    ]
    assert len(tables) >= 2
    for lines, start in tables:
        before = "\n".join(lines[:start])
        stem = re.findall(r"benchmarks/results/(quality_\w+_cpu)\.", before)[-1]
        report = json.loads((RESULTS / f"{stem}.json").read_text())
        by_seeds = {", ".join(f"{v:.1f}" for v in r["test"]): r for r in report["rows"]}
        rows = _rows_at(lines, start)
        assert len(rows) >= 2 and any(by_seeds[r[3]]["row"] == "maskd" for r in rows), stem
        for _, weight, mean, seeds, versus, val in rows:
            row = by_seeds[seeds]  # KeyError: a README row the report does not have
            want = (f"{row['weight']:g}", f"{row['mean']:.1f} ± {row['std']:.1f}")
            assert (weight, mean) == want, (stem, seeds)
            assert val == f"{statistics.fmean(row['val']):.1f}", (stem, seeds)
            if row["row"] == "maskd":
                assert versus == "", stem
            else:
                v = report["maskd_vs_ablations"][row["row"]]
                assert versus == f"{v['mean']:.1f} ± {v['std']:.1f}", (stem, seeds)


def test_gradient_table_is_the_levels_report():
    """The 128 px table of where each term's gradient lands: every share is the levels
    report's (P5-P7 summed), and every test AP the 128 px table report's mean."""
    levels = json.loads((RESULTS / "quality_detection_ranges128_levels_cpu.json").read_text())
    lv = levels["levels"]
    table = json.loads((RESULTS / "quality_detection_ranges128_cpu.json").read_text())
    means = {r["row"]: r["mean"] for r in table["rows"]}
    keys = {  # table label: (levels report key, table report row)
        "the task loss": ("task", None),
        "CWD": ("loss_cwd", "cwd"),
        "FitNet": ("loss_fitnet", "fitnet"),
        "MasKD, tokens learned without the head": ("loss_maskd_unweighted", "maskd_unweighted"),
        "MasKD, the head's tokens weighted equally": ("loss_maskd_equal", "maskd_nohead"),
        "FGD": ("loss_fgd", "fgd"),
        "MasKD, the head's weights": ("loss_maskd", "maskd"),
    }
    rows = _table_rows("| term | share of its gradient on P3 / P4 / P5–P7 |")
    assert [r[0] for r in rows] == list(keys)
    names = list(lv["levels"])
    for label, shares, in_boxes, ap in rows:
        key, row = keys[label]
        per = lv[key]
        want = [per[names[0]]["grad_share"], per[names[1]]["grad_share"],
                sum(per[n]["grad_share"] for n in names[2:])]  # fmt: skip
        assert shares == " / ".join(f"{100 * v:.0f}" for v in want) + " %", label
        boxes = [per[n]["in_boxes"] for n in names[:2]]
        assert in_boxes == " / ".join(f"{100 * v:.0f}" for v in boxes) + " %", label
        assert ap == ("" if row is None else f"{means[row]:.1f}"), label


def test_readme_headline_numbers_are_the_reports():
    """Every ``mean ± std`` the README's first paragraph of results ("Measured here") quotes
    is printed in one of the reports its overview links, or in a pooled report (draws of one
    task's data) the README links: a stale headline fails."""
    text = README.read_text()
    start = text.index("**Measured here**")
    headline = text[start : text.index("\n\n", start)]
    quoted = re.findall(r"[+−-]?\d+\.\d ± \d+\.\d", headline)
    assert len(quoted) >= 4
    pooled = re.findall(r"\((benchmarks/results/quality_\w+_draws\d+_\w+)\.md\)", text)
    printed = "\n".join((ROOT / f"{link}.md").read_text() for link in _overview()[1] + pooled)
    for value in quoted:
        assert value.lstrip("+−-") in printed, value


def test_pooled_tables_are_the_pooled_reports():
    """Each pooled report's tables (a column per draw, and MasKD paired with each peer by
    draw) stand in docs/results-detection.md as the report prints them."""
    doc = (ROOT / "docs" / "results-detection.md").read_text()
    pooled = sorted(RESULTS.glob("quality_*_draws*_*.md"))
    assert pooled
    for md in pooled:
        for header in ("| row | data seed", "| peer | per draw |"):
            assert _table_text(md.read_text(), header) in doc, (md.name, header)


def test_readme_pooled_tables_are_pooled_reports():
    """Every pooled table in the README (a column per draw, or MasKD paired by draw) is
    printed, as written, by one of the pooled reports."""
    text = README.read_text()
    printed = "\n".join(md.read_text() for md in RESULTS.glob("quality_*_draws*_*.md"))
    lines = text.splitlines()
    starts = [i for i, ln in enumerate(lines)
              if ln.startswith(("| row | data seed", "| peer | per draw |"))]  # fmt: skip
    assert starts, "README shows no pooled table"
    for i in starts:
        block = _table_text("\n".join(lines[i:]), lines[i][:12])
        assert block in printed, lines[i]


def test_clutter_pixel_weight_table_is_the_diagnosis_reports():
    """The table of MasKD's per-pixel loss weight inside the boxes on clutter's draws, in
    docs/results-detection.md: every cell is quality_diagnosis.py's value for that draw and
    FPN level (P3 is the FPN's output 0)."""
    doc = (ROOT / "docs" / "results-detection.md").read_text()
    lines = _table_text(doc, "| FPN level | data seed | boxes' share |").splitlines()[2:]
    assert len(lines) == 6
    for line in lines:
        level, seed, share, heaviest, head, free = (c.strip() for c in line.strip("|").split("|"))
        stem = f"quality_detection_clutter_data{seed}_diagnosis_cpu.json"
        masks = json.loads((RESULTS / stem).read_text())["masks"]
        _check_pixel_weight_row(masks, level, (share, heaviest, head, free))


def _fpn_output(level: str) -> str:
    """The diagnosis report's level name of a docs table's FPN level ("P3" -> output 0)."""
    return f"backbone.fpn:{int(level[1]) - 3}"


def _check_pixel_weight_row(masks: dict, level: str, cells: tuple[str, ...]) -> None:
    """One row of a pixel-weight table against a diagnosis report's masks: the boxes'
    share, the head's heaviest token, MasKD's weight in the boxes with the head's tokens
    and with tokens learned without it."""
    name = _fpn_output(level)
    h, u = masks["tokens"][name], masks["tokens_unweighted"][name]
    k = h["heaviest"]
    assert cells == (
        f"{h['box_share']:.2f}",
        f"{h['marked'][k]:.2f}, {h['mass_in_boxes'][k]:.2f}",
        f"{h['loss_weight_in_boxes']:.2f}",
        f"{u['loss_weight_in_boxes']:.2f}",
    ), level


def test_sparse_pixel_weight_table_is_the_diagnosis_report():
    """detection_sparse's table of MasKD's per-pixel loss weight inside the boxes, in
    docs/results-detection.md: every cell is quality_diagnosis.py's value for that level,
    the last one the head's tokens weighted equally."""
    doc = (ROOT / "docs" / "results-detection.md").read_text()
    lines = _table_text(doc, "| FPN level | boxes' share |").splitlines()[2:]
    masks = json.loads((RESULTS / "quality_detection_sparse_diagnosis_cpu.json").read_text())
    assert len(lines) == 3
    for line in lines:
        level, *cells, equal = (c.strip() for c in line.strip("|").split("|"))
        _check_pixel_weight_row(masks["masks"], level, tuple(cells))
        head = masks["masks"]["tokens"][_fpn_output(level)]
        assert equal == f"{head['loss_weight_in_boxes_equal']:.2f}", level


def test_spikes_table_is_the_spikes_report():
    """The table of early loss spikes per row stands in docs/results-detection.md as
    quality_spikes.py printed it."""
    doc = (ROOT / "docs" / "results-detection.md").read_text()
    md = (RESULTS / "quality_detection_clutter_spikes_cpu.md").read_text()
    assert _table_text(md, "| row | cells | spiked |") in doc


def test_warmup_choice_and_sweep_tables_are_the_reports():
    """The warm-ups chosen on validation (clutter, sparse) and the weight sweep under
    clutter's stand in docs/results-detection.md as quality_warmup.py and quality.py --tune
    printed them."""
    doc = (ROOT / "docs" / "results-detection.md").read_text()
    for stem, header in [("quality_detection_clutter_warmup_choice_cpu", "| warm-up steps |"),
                         ("quality_detection_sparse_warmup_choice_cpu", "| warm-up steps |"),
                         ("quality_detection_clutter_warmup_tuning_cpu", "| method |")]:  # fmt: skip
        md = (RESULTS / f"{stem}.md").read_text()
        assert _table_text(md, header) in doc, stem


def test_sparse_warmup_students_reproduce_the_choices_cells():
    """docs section 6: detection_sparse_warmup's student-alone cells on seeds 0 and 1 have the
    recipe and seeds of the warm-up choice's 200-step cells and reproduce their scores
    exactly (CPU training is deterministic per seed)."""
    cells = RESULTS / "quality_cells"
    for seed in (0, 1):
        table = json.loads(
            (cells / "detection_sparse_warmup" / f"student_s{seed}.json").read_text()
        )
        choice = json.loads(
            (cells / "detection_sparse" / f"student_warmup200_s{seed}.json").read_text()
        )
        for split in ("val", "test"):
            assert table[split] == choice[split], (seed, split)


def test_readme_mixed_precision_tables_are_the_reports():
    """Each mixed-precision table (one per CPU) shows its report's median step times, paired
    speed-ups and first-step loss differences, step kind by step kind."""
    text = README.read_text()
    reports = {
        "| step, channels-last | float32": RESULTS / "mixed_precision_cpu.json",
        "| step, channels-last, Xeon with AMX |": RESULTS / "xeon_amx" / "mixed_precision_cpu.json",
    }
    kinds = {"teacher training step": "teacher", "student training step": "student",
             "MasKD distillation step": "maskd"}  # fmt: skip
    for header, path in reports.items():
        steps = json.loads(path.read_text())["steps"]
        rows = _rows_at(text.splitlines(), text[: text.index(header)].count("\n"))
        assert len(rows) == 3, header
        for cells in rows:
            got = steps[next(v for k, v in kinds.items() if cells[0].startswith(k))]
            want = [f"{got['median_step_s']['float32']:.3f}",
                     f"{got['median_step_s']['bfloat16']:.3f}",
                     f"{got['paired_median_speedup']:.3f}×"]  # fmt: skip
            assert cells[1:4] == want, (header, cells)
            diff = f"{got['first_step_max_relative_loss_difference']:.1e}"
            assert cells[4].startswith(diff), (header, cells)
