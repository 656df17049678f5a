"""Lightning ``Trainer`` construction from a :class:`TrainerSpec`.

Loggers (TensorBoard + CSV under the run directory), atomic checkpoints, learning-rate
monitoring and the rich progress bar are wired here once for every job.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from maskd._checks import check_number
from maskd.engine.callbacks import ChannelsLast
from maskd.engine.checkpoint import AtomicCheckpointIO
from maskd.errors import UserTypeError

__all__ = ["TrainerSpec", "build_trainer"]


@dataclass
class TrainerSpec:
    """Lightning trainer settings.

    Args:
        max_steps: optimizer steps to train (-1: use ``max_epochs``).
        max_epochs: epochs to train when ``max_steps`` is -1.
        accelerator: ``cpu``, ``gpu``, ``auto``, ...
        devices: devices per node (an int, ``auto``, or a list as a string).
        num_nodes: nodes (multi-node through DDP under torchrun/SLURM).
        strategy: ``auto``, ``ddp``, ``ddp_find_unused_parameters_true``, ...
        precision: ``32-true``, ``16-mixed``, ``bf16-mixed``, ...: the training steps run under
            autocast; evaluation always runs in float32.
        gradient_clip_val: clip the gradient norm at this value (0: off; authors: 35).
        accumulate_grad_batches: micro-batches per optimizer step.
        val_every_n_epochs: validate every n epochs during training (0: never during training;
            ``run.validate`` still scores the model once at the end).
        val_every_n_steps: validate every n optimizer steps instead (0: off).
        checkpoint_every_n_steps: write ``checkpoints/last.ckpt`` every n steps (0: per epoch).
        log_every_n_steps: logging interval.
        deterministic: ``True``, ``False`` or ``warn`` (deterministic algorithms, warn where
            an op has none, e.g. some CUDA backward kernels).
        progress_bar: show the rich progress bar.
        limit_val_batches: fraction or count of validation batches (1.0: all).
        sync_batchnorm: turn the model's BatchNorm layers into ``SyncBatchNorm`` under DDP,
            so batch statistics span all processes (Lightning's ``sync_batchnorm``; the
            authors' segmentation with 2 images per GPU). Frozen / eval-mode BatchNorm
            layers keep their running statistics either way.
        channels_last: run every model (student, teacher, connectors) with its 4-D weights
            and activations in channels-last layout (:class:`~maskd.engine.callbacks.
            ChannelsLast`): faster convolutions on CPU and on tensor-core GPUs, the same
            values up to rounding (benchmarks/memory_format.py measures it).
    """

    max_steps: int = -1
    max_epochs: int = 1
    accelerator: str = "auto"
    devices: int | str = "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"
    gradient_clip_val: float = 0.0
    accumulate_grad_batches: int = 1
    val_every_n_epochs: int = 1
    val_every_n_steps: int = 0
    checkpoint_every_n_steps: int = 0
    log_every_n_steps: int = 10
    deterministic: bool | str = "warn"
    progress_bar: bool = True
    limit_val_batches: float | int = 1.0
    sync_batchnorm: bool = False
    channels_last: bool = False

    def __post_init__(self) -> None:
        if self.max_steps != -1:
            check_number(
                self.max_steps, "trainer.max_steps (-1: use max_epochs)", low=1, integer=True
            )
        check_number(self.max_epochs, "trainer.max_epochs", low=1, integer=True)
        check_number(self.num_nodes, "trainer.num_nodes", low=1, integer=True)
        check_number(self.gradient_clip_val, "trainer.gradient_clip_val", low=0)
        check_number(
            self.accumulate_grad_batches, "trainer.accumulate_grad_batches", low=1, integer=True
        )
        for name in ("val_every_n_epochs", "val_every_n_steps", "checkpoint_every_n_steps"):
            check_number(getattr(self, name), f"trainer.{name}", low=0, integer=True)
        check_number(self.log_every_n_steps, "trainer.log_every_n_steps", low=1, integer=True)
        check_number(self.limit_val_batches, "trainer.limit_val_batches", low=0, low_open=True)
        for name in ("sync_batchnorm", "channels_last"):
            if not isinstance(getattr(self, name), bool):
                raise UserTypeError(
                    f"trainer.{name} must be true or false, got {getattr(self, name)!r}"
                )


# MaskdDataModule restores the position inside an epoch itself (see its state_dict),
# which Lightning's check for stateful loaders cannot see.
warnings.filterwarnings("ignore", message=".*your dataloader is not resumable.*")
# Frozen teachers keep BatchNorm/Dropout in eval mode on purpose (stages 1 and 2).
warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode at the start of training.*")


def build_trainer(
    spec: TrainerSpec,
    run_dir: str | Path,
    callbacks: list[Callback] | None = None,
    evaluation_only: bool = False,
) -> L.Trainer:
    """A ``Trainer`` writing logs and ``checkpoints/last.ckpt`` (atomically) under ``run_dir``.

    ``evaluation_only``: no loggers, checkpoints or progress bar (``maskd evaluate``).
    """
    run_dir = Path(run_dir)
    if spec.channels_last:
        callbacks = [ChannelsLast(), *(callbacks or [])]
    if evaluation_only:
        return L.Trainer(
            default_root_dir=str(run_dir),
            accelerator=spec.accelerator,
            devices=_devices(spec.devices),
            num_nodes=spec.num_nodes,
            strategy=spec.strategy,
            precision=spec.precision,
            deterministic=spec.deterministic,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=spec.progress_bar,
            enable_model_summary=False,
            use_distributed_sampler=False,
            **(
                {}
                if spec.limit_val_batches == 1.0
                else {"limit_test_batches": spec.limit_val_batches}
            ),
            callbacks=list(callbacks or []),
        )
    ckpt = ModelCheckpoint(
        dirpath=run_dir / "checkpoints",
        filename="step{step}",
        save_top_k=0,
        save_last=True,
        every_n_train_steps=spec.checkpoint_every_n_steps or None,
        save_on_train_epoch_end=True,
        enable_version_counter=False,
    )
    cbs: list[Callback] = [ckpt, *(callbacks or [])]
    loggers = [
        TensorBoardLogger(run_dir, name="tensorboard", version=""),
        # A fresh CSV version per attempt: Lightning's CSV writer truncates an existing
        # file, and a resumed run must not erase the history of the interrupted one.
        CSVLogger(run_dir, name="csv"),
    ]
    cbs.append(LearningRateMonitor(logging_interval="step"))
    if spec.progress_bar:
        from lightning.pytorch.callbacks import RichProgressBar

        cbs.append(RichProgressBar())
    val_kwargs: dict[str, Any]
    if spec.val_every_n_steps:
        val_kwargs = {"val_check_interval": spec.val_every_n_steps, "check_val_every_n_epoch": None}
    elif spec.val_every_n_epochs:
        val_kwargs = {"check_val_every_n_epoch": spec.val_every_n_epochs}
    else:
        # Never during fit; trainer.validate() afterwards still sees every batch.
        val_kwargs = {"check_val_every_n_epoch": 2**31 - 1}
    if spec.limit_val_batches != 1.0 and "limit_val_batches" not in val_kwargs:
        val_kwargs["limit_val_batches"] = spec.limit_val_batches
    kwargs: dict[str, Any] = {
        "default_root_dir": str(run_dir),
        "max_steps": spec.max_steps,
        "max_epochs": spec.max_epochs if spec.max_steps < 0 else -1,
        "accelerator": spec.accelerator,
        "devices": _devices(spec.devices),
        "num_nodes": spec.num_nodes,
        "strategy": spec.strategy,
        "precision": spec.precision,
        "gradient_clip_val": spec.gradient_clip_val or None,
        "gradient_clip_algorithm": "norm",
        "accumulate_grad_batches": spec.accumulate_grad_batches,
        "sync_batchnorm": spec.sync_batchnorm,
        "log_every_n_steps": spec.log_every_n_steps,
        "deterministic": spec.deterministic,
        "callbacks": cbs,
        "logger": loggers,
        "plugins": [AtomicCheckpointIO()],
        "enable_progress_bar": spec.progress_bar,
        "enable_model_summary": False,
        "use_distributed_sampler": False,
        "num_sanity_val_steps": 0,
        **val_kwargs,
    }
    return L.Trainer(**kwargs)


def _devices(value: int | str) -> int | str | list[int]:
    if isinstance(value, str) and value.startswith("["):
        return [int(v) for v in value.strip("[]").split(",") if v.strip()]
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return value
