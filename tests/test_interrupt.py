"""SIGINT / SIGTERM during training: a checkpoint after the step in progress, one line, exit
code 128 + signal, and a resume that ends with the weights of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from maskd.engine.interrupt import Interrupted
from maskd.engine.jobs import RunArgs, _fit_and_finish
from maskd.engine.trainer import TrainerSpec
from test_engine import tiny_seg_run

STEPS = 6


class SignalAt(Callback):
    """Sends ``signals`` to this process at the start of step ``step`` (mid-step)."""

    def __init__(self, step: int, signals: list[int]) -> None:
        self.step, self.signals = step, signals

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step and self.signals:
            for signum in self.signals:
                os.kill(os.getpid(), signum)
            self.signals = []


def _run(out: Path, callbacks=None, resume: str | None = None) -> torch.nn.Module:
    model, module, data = tiny_seg_run(warmup_steps=2)
    spec = TrainerSpec(
        max_steps=STEPS,
        accelerator="cpu",
        progress_bar=False,
        val_every_n_epochs=0,
        checkpoint_every_n_steps=4,
        deterministic=True,
    )
    run = RunArgs(out=str(out), validate=False, resume=resume)
    _fit_and_finish(module, data, spec, run, callbacks, model.state_dict)
    return model


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_after_the_step_and_resume_is_exact(tmp_path, signum, capsys):
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN in a background job, else Python's
    straight = _run(tmp_path / "a")
    out = tmp_path / "b"
    # the signal comes during step 3 (index 2); periodic checkpoints are at 4 only
    with pytest.raises(Interrupted) as info:
        _run(out, callbacks=[SignalAt(2, [signum])])
    err = info.value
    assert err.exit_code == 128 + signum and err.step == 3 and err.saved
    assert signal.Signals(signum).name in str(err) and "after step 3" in str(err)
    ckpt = out / "checkpoints" / "last.ckpt"
    assert err.checkpoint == ckpt
    assert torch.load(ckpt, weights_only=False)["global_step"] == 3
    assert not (out / "done.json").exists() and not (out / "model.pt").exists()
    assert "stopping after this step" in capsys.readouterr().err
    # the handlers are back as they were
    assert signal.getsignal(signal.SIGINT) is before
    first = torch.load(ckpt, weights_only=False)["callbacks"]["FitClock"]["seconds"]
    resumed = _run(out, resume="auto")
    for (name, p), q in zip(
        straight.state_dict().items(), resumed.state_dict().values(), strict=True
    ):
        assert torch.equal(p, q), name
    done = json.loads((out / "done.json").read_text())
    assert done["global_step"] == STEPS
    # the training time counts both sittings: the checkpoint's seconds plus this one's
    assert first > 0 and done["sitting_seconds"] > 0
    assert done["fit_seconds"] == pytest.approx(first + done["sitting_seconds"])
    one_sitting = json.loads((tmp_path / "a" / "done.json").read_text())
    assert one_sitting["fit_seconds"] == one_sitting["sitting_seconds"]


def test_second_signal_stops_at_once_and_keeps_the_last_checkpoint(tmp_path):
    out = tmp_path / "run"
    # step index 5: the periodic checkpoint of step 4 exists; two signals abort mid-step
    with pytest.raises(Interrupted) as info:
        _run(out, callbacks=[SignalAt(5, [signal.SIGINT, signal.SIGINT])])
    err = info.value
    assert not err.saved and err.exit_code == 130
    assert err.checkpoint == out / "checkpoints" / "last.ckpt"
    assert "is kept" in str(err)
    assert torch.load(err.checkpoint, weights_only=False)["global_step"] == 4


def test_ctrl_c_on_the_command_line(tmp_path):
    """A real SIGINT to ``maskd train``: one line, exit 130, then ``--run.resume=auto`` ends."""
    data = tmp_path / "data"
    synth = [sys.executable, "-m", "maskd.cli", "data", "synth", "--out", str(data)]
    synth += ["--task", "segmentation", "--train", "4", "--val", "2", "--size", "32"]
    subprocess.run([*synth, "--preview", "0"], check=True, capture_output=True)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "maskd.cli", "train", "--model.name=lraspp_mobilenet_v3_large"]
    cmd += [f"--data.root={data}", "--data.kind=folder", "--data.batch_size=2", "--data.size=32"]
    cmd += ["--trainer.max_steps=100000", "--trainer.checkpoint_every_n_steps=1000"]
    cmd += ["--trainer.accelerator=cpu", "--trainer.progress_bar=false", f"--run.out={out}"]
    cmd += ["--run.validate=false"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "csv" / "version_0" / "metrics.csv"
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and metrics.stat().st_size > 0):  # training has started
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stderr
    lines = [ln for ln in stderr.splitlines() if ln.startswith("maskd:") and "warning:" not in ln]
    assert "Traceback" not in stderr, stderr
    assert "SIGINT received" in lines[0] and "interrupted by SIGINT after step" in lines[1]
    assert "--run.resume=auto" in lines[2]
    step = int(lines[1].split("after step ")[1].split(";")[0])
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == step >= 1
    resume = [c.replace("100000", str(step + 1)) for c in cmd] + ["--run.resume=auto"]
    subprocess.run(resume, check=True, capture_output=True, timeout=300)
    assert json.loads((out / "done.json").read_text())["global_step"] == step + 1
