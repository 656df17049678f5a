"""Callbacks: stage-1 token-mask images in TensorBoard, standalone token files, the
training time of a run over every sitting it took, and the channels-last memory layout."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor

from maskd.token_io import save_tokens
from maskd.visualize import mask_grid, summary_report, token_masks, token_summary

__all__ = ["ChannelsLast", "FitClock", "MaskImageLogger", "TokenSaver"]


class MaskImageLogger(Callback):
    """After every validation of stage 1, log each level's token masks over fixed images.

    One TensorBoard image per level (``masks/<level>``): rows are the images, columns the
    image followed by one overlay per token. At the end of training it prints each token's
    coverage and head weight over the images (:func:`~maskd.visualize.head_notes` flags a
    head settled on one token that covers nearly all or nearly none of the positions).

    Args:
        images: a few fixed validation images ``[3, H, W]`` (same size).
        mean / std: normalisation to undo for display (segmentation inputs), or ``None``.
        summary_path: where the end-of-training summary is also written (JSON:
            ``{level: {"coverage": [T], "weight": [T] or null}}``), or ``None``.
    """

    def __init__(
        self,
        images: Sequence[Tensor],
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        summary_path: str | Path | None = None,
    ) -> None:
        self.images = [img.detach().cpu() for img in images]
        self.mean, self.std = mean, std
        self.summary_path = None if summary_path is None else Path(summary_path)

    def log_masks(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, np.ndarray]:
        learner = pl_module.learner
        masks = token_masks(learner.teacher, learner.tokens(), self.images)
        grids = {name: mask_grid(self.images, m, self.mean, self.std) for name, m in masks.items()}
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                for name, grid in grids.items():
                    logger.experiment.add_image(
                        f"masks/{name}", grid, trainer.global_step, dataformats="HWC"
                    )
        return grids

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero and not trainer.sanity_checking:
            self.log_masks(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Print what each token covers and what the head gives it over the images, and a
        note for each level where the head has settled on one token (see ``head_notes``)."""
        if not trainer.is_global_zero:
            return
        learner = pl_module.learner
        summary = token_summary(learner.teacher, learner.tokens(), self.images)
        if self.summary_path is not None:
            self.summary_path.write_text(json.dumps(summary, indent=1) + "\n")
        print(f"tokens over {len(self.images)} validation images (mean mask = coverage, "
              "head weight), per level:", flush=True)  # fmt: skip
        for line in summary_report(summary):
            print(line, flush=True)


class TokenSaver(Callback):
    """Write the learner's tokens to ``path`` (``maskd.save_tokens`` format) after training
    and whenever a checkpoint is saved, so a usable token file exists even mid-run."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def _save(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            save_tokens(self.path, pl_module.learner.tokens())

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:  # type: ignore[override]
        self._save(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        with torch.no_grad():
            self._save(trainer, pl_module)


class FitClock(Callback):
    """Seconds of training over every sitting of a run that was stopped and resumed.

    Each checkpoint carries the seconds trained until it was written, and a run resumed from
    it starts counting from there; steps redone after the checkpoint (work a kill lost) count
    once, in the sitting that kept them. ``seconds``: the whole run so far; ``sitting``: this
    process's share.
    """

    def __init__(self) -> None:
        self.before = 0.0  # from the checkpoint this run resumed from
        self._start: float | None = None

    @property
    def sitting(self) -> float:
        return 0.0 if self._start is None else time.perf_counter() - self._start

    @property
    def seconds(self) -> float:
        return self.before + self.sitting

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()

    def state_dict(self) -> dict[str, float]:
        return {"seconds": self.seconds}

    def load_state_dict(self, state_dict: dict[str, float]) -> None:
        self.before = float(state_dict["seconds"])


class ChannelsLast(Callback):
    """Hold the module's 4-D weights in channels-last (NHWC) layout while a trainer runs it.

    Convolutions then take the NHWC kernels of oneDNN on CPU (and of cuDNN's tensor cores
    on GPU), and their outputs stay NHWC from the first layer on; the inputs need no change.
    Values differ from the default layout only by floating-point rounding. The layout is set
    in ``setup``, before the strategy moves the module and builds its optimizer (so DDP's
    gradient buckets see the final strides), and set back in ``teardown``: weights saved
    after training, and the module a caller keeps, are in the default layout.
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        pl_module.to(memory_format=torch.channels_last)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        pl_module.to(memory_format=torch.contiguous_format)
