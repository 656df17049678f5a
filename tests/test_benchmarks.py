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
