"""SIGKILL at a random moment of each job (train, learn-masks, distill), sometimes during a
checkpoint write, then ``--run.resume=auto``: the same final weights as a run never killed."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

STEPS = 20
COMMON = [
    "--data.kind=folder",
    "--data.size=32",
    "--data.batch_size=2",
    f"--trainer.max_steps={STEPS}",
    "--trainer.checkpoint_every_n_steps=3",
    "--trainer.accelerator=cpu",
    "--trainer.progress_bar=false",
    "--run.validate=false",
]
TEACHER = ["--teacher.name=lraspp_mobilenet_v3_large"]


def _maskd(*args: str) -> list[str]:
    return [sys.executable, "-m", "maskd.cli", *args]


def _jobs(data: Path, base: Path) -> dict[str, tuple[list[str], str]]:
    """Each job's command line (outputs under ``base``) and the file it produces."""
    teacher = f"--teacher.weights={base / 'train' / 'model.pt'}"
    tokens = f"--distill.tokens={base / 'learn-masks' / 'tokens.pt'}"
    data_root = f"--data.root={data}"
    return {
        "train": (_maskd("train", "--model.name=lraspp_mobilenet_v3_large", data_root), "model.pt"),
        "learn-masks": (
            _maskd("learn-masks", *TEACHER, teacher, "--masks.num_tokens=2", data_root),
            "tokens.pt",
        ),
        "distill": (
            _maskd(
                "distill",
                "--student.name=lraspp_mobilenet_v3_large",
                *TEACHER,
                teacher,
                tokens,
                "--distill.align=false",
                data_root,
            ),
            "model.pt",
        ),
    }


def _state(path: Path) -> dict[str, torch.Tensor]:
    obj = torch.load(path, weights_only=True)
    flat: dict[str, torch.Tensor] = {}

    def walk(prefix: str, value: object) -> None:
        if isinstance(value, torch.Tensor):
            flat[prefix] = value
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(f"{prefix}.{i}", v)

    walk("", obj)
    return flat


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("seg")
    cmd = _maskd("data", "synth", "--out", str(root), "--task", "segmentation", "--train", "6")
    subprocess.run([*cmd, "--val", "2", "--size", "32", "--preview", "0"], check=True)
    return root


@pytest.mark.slow
def test_sigkill_anywhere_then_resume_gives_the_uninterrupted_weights(data, tmp_path):
    rng = random.Random(0)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    for job in ("train", "learn-masks", "distill"):
        # the uninterrupted reference; the killed chain uses the reference's teacher and tokens
        cmd, product = _jobs(data, straight)[job]
        subprocess.run([*cmd, *COMMON, f"--run.out={straight / job}"], check=True,
                       capture_output=True, timeout=600)  # fmt: skip
        out = killed / job
        args = [*cmd, *COMMON, f"--run.out={out}"]
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        first = out / "checkpoints" / "last.ckpt"
        deadline = time.monotonic() + 300
        while not first.is_file() and proc.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.8))  # somewhere in the next steps, maybe mid-write
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        step = torch.load(first, weights_only=True)["global_step"] if first.is_file() else 0
        assert step < STEPS or proc.returncode == 0, "killed too late to test anything"
        resumed = subprocess.run([*args, "--run.resume=auto"], capture_output=True, text=True,
                                 timeout=600)  # fmt: skip
        assert resumed.returncode == 0, resumed.stderr
        assert json.loads((out / "done.json").read_text())["global_step"] == STEPS
        assert not list(out.rglob("*.tmp")), "a temporary file was left behind"
        a, b = _state(straight / job / product), _state(out / product)
        assert a.keys() == b.keys() and a, job
        for key in a:
            assert torch.equal(a[key], b[key]), (job, key)


def test_a_full_disk_at_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    """A write that fails midway (ENOSPC) at the second checkpoint: the run stops with the
    OS error, the first checkpoint still loads, no temporary is left, and resuming ends with
    the weights of a run that never failed."""
    import errno

    import maskd.atomic as atomic
    from test_interrupt import _run

    straight = _run(tmp_path / "a")
    real_save, calls = atomic.torch.save, []

    def failing_save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second checkpoint: half written, then the disk is full
            f.write(b"\0" * 1024)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(atomic.torch, "save", failing_save)
    out = tmp_path / "b"
    with pytest.raises(OSError, match="No space left"):
        _run(out)
    monkeypatch.setattr(atomic.torch, "save", real_save)
    ckpt = out / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=False)["global_step"] == 4  # the first checkpoint
    assert not list(out.rglob("*.tmp"))
    resumed = _run(out, resume="auto")
    for (name, p), q in zip(
        straight.state_dict().items(), resumed.state_dict().values(), strict=True
    ):
        assert torch.equal(p, q), name
