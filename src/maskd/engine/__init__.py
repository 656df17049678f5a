"""Training engine (Lightning): modules for the three jobs, optimizers and schedules,
atomic checkpoints, resumable data loading, and the jobs the command line runs."""

from maskd.engine.checkpoint import AtomicCheckpointIO, atomic_save, find_last_checkpoint
from maskd.engine.config import DataArgs, ModelArgs
from maskd.engine.datamodule import MaskdDataModule
from maskd.engine.jobs import (
    DistillArgs,
    MaskArgs,
    RunArgs,
    run_distill,
    run_evaluate,
    run_learn_masks,
    run_train,
)
from maskd.engine.modules import DistillModule, LearnMasksModule, MaskdModule, TrainModule
from maskd.engine.optim import OptimSpec, build_optimizer, build_scheduler, lr_factor
from maskd.engine.trainer import TrainerSpec, build_trainer

__all__ = [
    "AtomicCheckpointIO",
    "DataArgs",
    "DistillArgs",
    "DistillModule",
    "LearnMasksModule",
    "MaskArgs",
    "MaskdDataModule",
    "MaskdModule",
    "ModelArgs",
    "OptimSpec",
    "RunArgs",
    "TrainModule",
    "TrainerSpec",
    "atomic_save",
    "build_optimizer",
    "build_scheduler",
    "build_trainer",
    "find_last_checkpoint",
    "lr_factor",
    "run_distill",
    "run_evaluate",
    "run_learn_masks",
    "run_train",
]
