"""Smoke test of the teacher-gap benchmark: it drives the real command line end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "teacher_gap.py"


def test_teacher_gap_writes_curves_and_final_scores(tmp_path):
    cmd = [sys.executable, str(SCRIPT), "--task", "segmentation", "--size", "32"]
    cmd += ["--train", "4", "--val", "2", "--steps", "2", "--eval-every", "1"]
    cmd += ["--batch-size", "2", "--models", "lraspp_mobilenet_v3_large"]
    cmd += ["--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
    report = json.loads((tmp_path / "out" / "teacher_gap_segmentation_cpu.json").read_text())
    (row,) = report["rows"]
    run = tmp_path / "work" / "segmentation" / "lraspp_mobilenet_v3_large"
    final = json.loads((run / "metrics.json").read_text())
    assert row["final"] == final
    steps = [s for s, _ in row["curve"]]
    assert steps == sorted(steps) and steps[-1] == 2 and len(steps) >= 2
    assert row["curve"][-1][1] == final["val/miou"]
    md = (tmp_path / "out" / "teacher_gap_segmentation_cpu.md").read_text()
    assert "`lraspp_mobilenet_v3_large`" in md and f"{100 * final['val/miou']:.1f}" in md


QUALITY = SCRIPT.with_name("quality.py")


def test_quality_quick_runs_every_kind_of_cell_and_resumes(tmp_path):
    """``quality.py --quick``: tuning then the table, one cell of each kind, from result files."""
    work, out = tmp_path / "work", tmp_path / "out"
    base = [sys.executable, str(QUALITY), "--quick", "--work", str(work), "--out", str(out)]
    subprocess.run([*base, "--tune"], check=True, capture_output=True, text=True, timeout=900)
    tuning = json.loads((out / "quality_detection_tuning_cpu.json").read_text())
    assert sorted(tuning["methods"]) == ["cwd", "fgd", "fitnet", "maskd"]
    for method, entry in tuning["methods"].items():
        cell = work / "detection" / f"tune_{method}_w{tuning['grid'][0]:g}" / "result.json"
        assert entry["val"][f"{tuning['grid'][0]:g}"] == json.loads(cell.read_text())["val"]["map"]
        assert entry["chosen"] == tuning["grid"][0]
    subprocess.run(base, check=True, capture_output=True, text=True, timeout=900)
    report = json.loads((out / "quality_detection_cpu.json").read_text())
    rows = {r["row"]: r for r in report["rows"]}
    assert set(rows) == {"student", "fitnet", "cwd", "fgd", "maskd", "maskd_random"}
    for name, row in rows.items():
        result = json.loads((work / "detection" / f"{name}_s0" / "result.json").read_text())
        assert row["test"] == [100 * result["test"]["map"]]
        assert row["diff_to_student"] == [row["test"][0] - rows["student"]["test"][0]]
    assert rows["maskd"]["weight"] == tuning["methods"]["maskd"]["chosen"]
    assert (out / "quality_detection_cpu.png").stat().st_size > 1000
    md = (out / "quality_detection_cpu.md").read_text()
    assert "| MasKD, untrained (random) tokens |" in md and "teacher (fcos_resnet50_fpn)" in md
    # a second run finds every cell finished and trains nothing
    again = subprocess.run(base, check=True, capture_output=True, text=True, timeout=120)
    assert " done in " not in again.stdout
