"""``maskd demo`` on a tiny configuration: report contents, skipping finished stages, and
determinism (an uninterrupted run and a run killed in stage 2 then re-run agree exactly)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback

import maskd.engine.jobs as jobs
from maskd.demo import benchmark_results, run_demo

DET = {"name": "fcos_resnet18_fpn", "options": {"min_size": 64, "max_size": 64}}
DATA = {"kind": "coco", "batch_size": 2, "val_batch_size": 4}
TRAINER = {
    "max_steps": 2,
    "accelerator": "cpu",
    "devices": 1,
    "val_every_n_epochs": 0,
    "checkpoint_every_n_steps": 1,
    "log_every_n_steps": 1,
    "progress_bar": False,
}
RUN = {"seed": 0, "validate": False}
SGD = {"name": "sgd", "lr": 0.01, "schedule": "cosine", "warmup_steps": 1}


def write_configs(folder: Path) -> Path:
    folder.mkdir()
    stages = {
        "demo.yaml": {
            "data": {"task": "detection", "train": 6, "val": 4, "size": 64, "seed": 0},
            "mask_images": 2,
        },
        "teacher.yaml": {"model": DET, "data": DATA, "optim": SGD, "trainer": TRAINER, "run": RUN},
        "student.yaml": {
            "model": {**DET, "name": "fcos_mobilenet_v3_large_fpn"},
            "data": DATA,
            "optim": SGD,
            "trainer": TRAINER,
            "run": RUN,
        },
        "learn_masks.yaml": {
            "teacher": DET,
            "masks": {"num_tokens": 2, "weighted": True},
            "data": DATA,
            "optim": {"name": "adam", "lr": 0.01},
            "trainer": TRAINER,
            "run": RUN,
        },
        "distill.yaml": {
            "student": {**DET, "name": "fcos_mobilenet_v3_large_fpn"},
            "teacher": DET,
            "distill": {"loss_weight": 10.0, "custom_mask_warmup": 1},
            "data": DATA,
            "optim": SGD,
            "trainer": {**TRAINER, "max_steps": 3},
            "run": RUN,
        },
    }
    for name, cfg in stages.items():
        (folder / name).write_text(yaml.safe_dump(cfg))
    return folder


class Crash(Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 2:
            raise RuntimeError("killed")


def metric_rows(report: str) -> list[str]:
    section = report.split("## Metrics")[1].split("\n## ")[0]
    return [line for line in section.splitlines() if line.startswith(("| teacher", "| student"))]


@pytest.mark.slow
def test_demo_report_resume_and_determinism(tmp_path, monkeypatch, capsys):
    configs = write_configs(tmp_path / "cfg")
    a = run_demo("detection", tmp_path / "a", configs=configs)
    text = a.read_text()
    rows = metric_rows(text)
    assert [r.split("|")[1].strip() for r in rows] == ["teacher", "student", "student + MasKD"]
    # the numbers in the table are the evaluation results of this run
    for row, run in zip(rows, ("teacher", "student", "distill"), strict=True):
        ap = json.loads((tmp_path / "a" / "evaluate" / f"{run}.json").read_text())["map"]
        cell = row.split("|")[3].strip()
        assert cell == f"{100 * ap:.1f}"
    # the gap line and the benchmark's seed-to-seed spread next to this run's numbers
    ap = {
        run: 100 * json.loads((tmp_path / "a" / "evaluate" / f"{run}.json").read_text())["map"]
        for run in ("teacher", "student", "distill")
    }
    assert f"Teacher ahead of the student alone by {ap['teacher'] - ap['student']:.1f}" in text
    bench = json.loads(Path(benchmark_results("detection")).read_text())
    student = next(r for r in bench["rows"] if r["row"] == "student")
    noise = text.split("## How much is noise")[1].split("\n## ")[0]
    assert f"| student alone | {student['mean']:.1f} ± {student['std']:.1f} |" in noise
    timings = text.split("## Timings")[1]
    assert "## Metrics" not in timings and re.search(r"\| teacher \| \d+\.\d \|", timings)
    assert "AP" not in text.split("## Timings")[1].split("## Figures")[0]
    for png in ("loss_curves.png", "token_masks.png"):
        assert (tmp_path / "a" / png).stat().st_size > 1000

    # re-running skips every finished stage and reproduces the report's metrics
    capsys.readouterr()
    run_demo("detection", tmp_path / "a", configs=configs)
    assert capsys.readouterr().out.count("done earlier, skipped") == 4
    assert metric_rows(a.read_text()) == rows

    # a second run, killed in stage 2 after a checkpoint, then re-run: same numbers
    real = jobs.build_trainer
    crashed = []

    def crashing(spec, run_dir, callbacks=None, evaluation_only=False):
        extra = []
        if Path(run_dir).name == "distill" and not crashed:
            crashed.append(True)
            extra = [Crash()]
        return real(
            spec, run_dir, callbacks=[*(callbacks or []), *extra], evaluation_only=evaluation_only
        )

    monkeypatch.setattr(jobs, "build_trainer", crashing)
    with pytest.raises(RuntimeError, match="killed"):
        run_demo("detection", tmp_path / "b", configs=configs)
    assert (tmp_path / "b" / "distill" / "checkpoints" / "last.ckpt").is_file()
    assert not (tmp_path / "b" / "distill" / "done.json").exists()
    b = run_demo("detection", tmp_path / "b", configs=configs)
    assert metric_rows(b.read_text()) == rows
    sa = torch.load(tmp_path / "a" / "distill" / "model.pt", weights_only=True)
    sb = torch.load(tmp_path / "b" / "distill" / "model.pt", weights_only=True)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert json.loads((tmp_path / "b" / "timings.json").read_text())["distill"]["resumed"]
