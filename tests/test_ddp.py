"""DDP through Lightning's ``ddp`` strategy: 2 CPU processes (gloo) against 1 process.

With the same global batch (2 × 2 images vs. 1 × 4), the two runs must end with the same
parameters (within float tolerance; the reduction order differs), both ranks must hold
identical parameters, and validation (each rank scores half the images, torchmetrics
gathers them) must give the single-process metrics.

The model has no BatchNorm on purpose: BatchNorm normalises with per-process batch
statistics (2 images per rank vs. 4 in one process), so its outputs, and therefore the
gradients, legitimately differ between the two set-ups. SyncBatchNorm would be needed to
make them agree, which is a model choice, not something the engine should change silently.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent

SCRIPT = textwrap.dedent(
    """
    import json, sys, warnings
    import torch
    sys.path.insert(0, {tests!r})
    from test_engine import RandomSegData, TinySeg
    from maskd.engine.datamodule import MaskdDataModule
    from maskd.engine.modules import TrainModule
    from maskd.engine.optim import OptimSpec
    from maskd.engine.trainer import TrainerSpec, build_trainer
    from maskd.metrics import SegmentationMetrics

    devices, batch, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    torch.manual_seed(0)
    model = TinySeg()
    optim = OptimSpec(name="sgd", lr=0.2, momentum=0.9, schedule="cosine", warmup_steps=2)
    module = TrainModule(model, "segmentation", 3, optim=optim, seed=4,
                         metrics_factory=lambda: SegmentationMetrics(3, 255))
    data = MaskdDataModule(RandomSegData(16), RandomSegData(6), batch_size=batch,
                           val_batch_size=2, seed=2)
    spec = TrainerSpec(max_steps=5, accelerator="cpu", devices=devices,
                       strategy="ddp" if devices > 1 else "auto", progress_bar=False,
                       val_every_n_epochs=0, gradient_clip_val=1.0, log_every_n_steps=1)
    trainer = build_trainer(spec, out)
    trainer.fit(module, datamodule=data)
    metrics = trainer.validate(module, datamodule=data, verbose=False)[0]
    rank = trainer.global_rank
    torch.save(model.state_dict(), f"{{out}}/rank{{rank}}.pt")
    with open(f"{{out}}/metrics{{rank}}.json", "w") as f:
        json.dump(metrics, f)
    """
)


def _run(tmp_path: Path, devices: int, batch: int) -> Path:
    out = tmp_path / f"d{devices}"
    out.mkdir()
    script = tmp_path / "ddp_run.py"
    script.write_text(SCRIPT.format(tests=str(TESTS)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PL_DISABLE_FORK": "1"}
    proc = subprocess.run(
        [sys.executable, str(script), str(devices), str(batch), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.slow
def test_ddp_two_cpu_processes_match_single_process(tmp_path):
    ddp = _run(tmp_path, devices=2, batch=2)
    single = _run(tmp_path, devices=1, batch=4)
    r0 = torch.load(ddp / "rank0.pt", weights_only=True)
    r1 = torch.load(ddp / "rank1.pt", weights_only=True)
    one = torch.load(single / "rank0.pt", weights_only=True)
    init = __import__("test_engine").TinySeg()
    for key in one:
        assert torch.equal(r0[key], r1[key]), f"ranks out of sync at {key}"
        torch.testing.assert_close(r0[key], one[key], rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(one[k], v) for k, v in init.state_dict().items())  # it trained
    m0 = json.loads((ddp / "metrics0.json").read_text())
    m1 = json.loads((ddp / "metrics1.json").read_text())
    ms = json.loads((single / "metrics0.json").read_text())
    assert m0 == m1
    assert m0["val/miou"] == pytest.approx(ms["val/miou"], abs=1e-6)
    assert m0["val/pixel_acc"] == pytest.approx(ms["val/pixel_acc"], abs=1e-6)
