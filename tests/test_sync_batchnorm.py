"""``trainer.sync_batchnorm`` reaches Lightning's Trainer (SyncBatchNorm under DDP)."""

from __future__ import annotations

import pytest
from lightning.pytorch.plugins.layer_sync import TorchSyncBatchNorm
from torch import nn

from maskd.engine.trainer import TrainerSpec, build_trainer


def spec(**kwargs) -> TrainerSpec:
    return TrainerSpec(
        max_steps=1, accelerator="cpu", devices=1, strategy="ddp", progress_bar=False, **kwargs
    )


def test_sync_batchnorm_reaches_the_lightning_trainer(tmp_path) -> None:
    on = build_trainer(spec(sync_batchnorm=True), tmp_path / "on")
    assert isinstance(on.strategy._layer_sync, TorchSyncBatchNorm)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    converted = on.strategy._layer_sync.apply(model)
    assert isinstance(converted[1], nn.SyncBatchNorm)
    off = build_trainer(spec(), tmp_path / "off")
    assert off.strategy._layer_sync is None


def test_sync_batchnorm_must_be_a_bool() -> None:
    with pytest.raises(TypeError, match="trainer.sync_batchnorm must be true or false"):
        spec(sync_batchnorm="yes")
