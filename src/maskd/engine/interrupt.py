"""Stopping a run on SIGINT (Ctrl-C) or SIGTERM (what schedulers send before a kill).

The first signal asks the run to stop: the optimizer step in progress finishes, a resumable
``checkpoints/last.ckpt`` is written (so the steps since the periodic checkpoint are kept),
and :class:`Interrupted` ends the job; the command line turns it into one line and exit code
``128 + signal`` (130 for SIGINT, 143 for SIGTERM). A second signal stops at once, keeping
the last checkpoint written. In DDP every rank stops at the same step: the ranks agree on
"a signal came" once per step, as Lightning does for SIGTERM.
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

__all__ = ["Interrupted", "SignalReceived", "StopOnSignal", "raise_on_signal"]

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    """A run stopped by a signal.

    Attributes:
        signum: the signal number.
        step: optimizer steps completed when it stopped.
        checkpoint: the checkpoint to resume from (``None`` if none was written yet).
    """

    def __init__(self, signum: int, step: int, checkpoint: Path | None, saved: bool) -> None:
        self.signum = signum
        self.step = step
        self.checkpoint = checkpoint
        self.saved = saved
        name = signal.Signals(signum).name
        if checkpoint is None:
            where = "no checkpoint was written yet; a new start begins at step 0"
        elif saved:
            where = f"saved {checkpoint}"
        else:
            where = f"the last checkpoint, {checkpoint}, is kept"
        super().__init__(f"interrupted by {name} after step {step}; {where}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopOnSignal(Callback):
    """Turn SIGINT / SIGTERM during ``fit`` into "save a checkpoint after this step, then stop"."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}
        self._step_at_start = 0

    # ---- handlers ---------------------------------------------------------------------------
    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:  # a second signal: stop now
            self._restore()
            raise SignalReceived(signum)
        self.signum = signum
        name = signal.Signals(signum).name
        print(
            f"maskd: {name} received; stopping after this step and saving a checkpoint "
            "(send it again to stop at once)",
            file=sys.stderr,
            flush=True,
        )

    def _install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signals reach the main thread only; nothing to install
        for signum in SIGNALS:
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._handle)

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    # ---- hooks ------------------------------------------------------------------------------
    # Installed once training starts, after Lightning's own SIGTERM handler (which would stop
    # between accumulation micro-batches, without a checkpoint), and restored before
    # Lightning's teardown puts back the handlers it found.
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.signum = None
        self._install()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self._step_at_start = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self._step_at_start:
            return  # mid gradient accumulation: the step is not finished
        stop = self.signum is not None
        if trainer.world_size > 1:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if not stop:
            return
        signum = self.signum if self.signum is not None else int(signal.SIGTERM)
        path = _last_checkpoint(trainer)
        if path is not None:
            trainer.save_checkpoint(path)
        self._restore()
        raise Interrupted(signum, trainer.global_step, path, saved=path is not None)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exc: Any) -> None:
        self._restore()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore()


class SignalReceived(BaseException):
    """A signal that stops the process where it is (outside a step boundary).

    A ``BaseException``, like ``KeyboardInterrupt``, so that ``except Exception`` blocks on the
    way up do not swallow it.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def raise_on_signal(signum: int, frame: FrameType | None) -> None:
    """A handler for SIGINT / SIGTERM outside training: stop at once with a known signal."""
    raise SignalReceived(signum)


def _last_checkpoint(trainer: L.Trainer) -> Path | None:
    callback = trainer.checkpoint_callback
    dirpath = getattr(callback, "dirpath", None)
    return None if dirpath is None else Path(dirpath) / "last.ckpt"
