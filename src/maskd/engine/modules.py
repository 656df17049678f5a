"""LightningModules for the three jobs: train a task model, learn tokens, distill.

All three share :class:`MaskdModule`: a training step sums the dict of losses the
wrapped module returns (every term logged), validation/test run a plain task model
in eval mode through ``maskd.metrics``, and the optimizer only ever sees parameters
that require grad (a frozen teacher or frozen tokens can never be stepped).

Stage-1 and stage-2 checkpoints leave the frozen teacher out (it is rebuilt from its own
weights file when a run starts or resumes); a SHA-256 of its state, stored instead, makes a
resume with different teacher weights fail loudly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal

import lightning as L
import torch
from torch import nn

from maskd.engine.optim import OptimSpec, build_optimizer, build_scheduler
from maskd.engine.sampling import mix_seed
from maskd.errors import UserTypeError, UserValueError
from maskd.fingerprint import state_fingerprint
from maskd.terms.base import total_loss
from maskd.tokens import ReceptiveTokens

__all__ = ["DistillModule", "LearnMasksModule", "MaskdModule", "TrainModule", "make_metrics"]

Task = Literal["detection", "segmentation"]


def make_metrics(task: Task, num_classes: int, ignore_index: int = 255) -> nn.Module:
    """The ``maskd.metrics`` collection for ``task``."""
    from maskd import metrics

    if task == "detection":
        return metrics.DetectionMetrics()
    if task == "segmentation":
        return metrics.SegmentationMetrics(num_classes=num_classes, ignore_index=ignore_index)
    raise UserValueError(f"unknown task {task!r} (detection, segmentation)")


def _batch_size(images: Any) -> int:
    return images.shape[0] if isinstance(images, torch.Tensor) else len(images)


class MaskdModule(L.LightningModule):
    """Shared training / evaluation logic.

    Args:
        net: module called in training as ``net(images, targets) -> dict[str, Tensor]``.
        task: ``detection`` or ``segmentation`` (picks the metrics).
        num_classes: classes for the segmentation metric.
        optim: optimizer and schedule.
        seed: base of the per-step seeds (see :meth:`training_step`).
        ignore_index: unlabelled pixel value for segmentation.
        meta: JSON-able description of the job (model names, layers, ...) stored in
            every checkpoint under ``"maskd"`` for ``maskd export`` / ``evaluate``.
        metrics_factory: override for the metric object (tests).
    """

    def __init__(
        self,
        net: nn.Module,
        task: Task,
        num_classes: int,
        optim: OptimSpec | None = None,
        seed: int = 0,
        ignore_index: int = 255,
        meta: dict[str, Any] | None = None,
        metrics_factory: Callable[[], nn.Module] | None = None,
    ) -> None:
        super().__init__()
        self.net = net
        self.task = task
        self.optim = optim or OptimSpec()
        self.seed = seed
        self.meta = dict(meta or {})
        factory = metrics_factory or (lambda: make_metrics(task, num_classes, ignore_index))
        self.val_metrics = factory()
        self.test_metrics = factory()

    # ---- what subclasses decide -------------------------------------------------
    def eval_model(self) -> nn.Module:
        """The task model whose predictions validation and test score."""
        return self.net

    def trainable_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Named parameters handed to the optimizer (``requires_grad`` ones only)."""
        for name, p in self.net.named_parameters():
            if p.requires_grad:
                yield name, p

    # ---- training ---------------------------------------------------------------
    def training_step(self, batch: tuple[Any, Any], batch_idx: int) -> torch.Tensor:
        """Sum of the net's losses (:func:`maskd.terms.total_loss`: the per-level values a
        distiller returns, keys with a ``/``, are logged, not summed).

        The global RNG is re-seeded from (seed, step, micro-batch, rank) first, so the
        random choices inside models (proposal sampling, dropout) depend only on the
        position in training: a resumed run draws the same numbers as an uninterrupted one.
        """
        images, targets = batch
        torch.manual_seed(mix_seed(self.seed, self.global_step, batch_idx, self.global_rank))
        losses = self.net(images, targets)
        if not isinstance(losses, dict) or not losses:
            raise UserTypeError("in training mode the model must return a non-empty dict of losses")
        total = total_loss(losses)
        if not bool(torch.isfinite(total)):
            terms = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in losses.items())
            raise FloatingPointError(
                f"non-finite training loss at step {self.global_step} ({terms}); lower the "
                "learning rate or the loss weights, or clip gradients (trainer.gradient_clip_val)"
            )
        n = _batch_size(images)
        for key, value in losses.items():
            self.log(f"train/{key}", value.detach().float(), batch_size=n)
        self.log("train/loss", total.detach(), prog_bar=True, batch_size=n)
        return total

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = build_optimizer(self.trainable_parameters(), self.optim, self.net)
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = build_scheduler(optimizer, self.optim, total)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
        }

    # ---- evaluation -------------------------------------------------------------
    def _evaluate(self, batch: tuple[Any, Any], metric: nn.Module) -> None:
        """Predictions in full precision, whatever ``trainer.precision`` trains in (as
        torchvision's references evaluate): boxes decoded in bfloat16 are off by up to a
        pixel at 128 px, which moves mAP at strict IoU thresholds."""
        images, targets = batch
        model = self.eval_model()
        with torch.no_grad(), torch.autocast(self.device.type, enabled=False):
            preds = model(images)
        metric.update(preds, targets)

    def _finish(self, metric: nn.Module, prefix: str) -> dict[str, float]:
        values = {
            f"{prefix}/{k}": float(v)
            for k, v in metric.compute().items()
            if isinstance(v, (int, float)) or (torch.is_tensor(v) and v.numel() == 1)
        }
        metric.reset()
        # compute() already gathered every rank's samples; no second reduction.
        for key, value in values.items():
            self.log(key, value, rank_zero_only=False, sync_dist=False)
        return values

    def validation_step(self, batch: tuple[Any, Any], batch_idx: int) -> None:
        self._evaluate(batch, self.val_metrics)

    def on_validation_epoch_end(self) -> None:
        self._finish(self.val_metrics, "val")

    def test_step(self, batch: tuple[Any, Any], batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics)

    def on_test_epoch_end(self) -> None:
        self._finish(self.test_metrics, "test")

    # ---- checkpoints ------------------------------------------------------------
    def frozen_teacher(self) -> nn.Module | None:
        """A frozen sub-module (``self.net.teacher``) that checkpoints leave out, or ``None``."""
        return None

    def teacher_state_kept(self) -> set[str]:
        """Names in the frozen teacher's state dict that checkpoints keep (default: none)."""
        return set()

    def _teacher_fingerprint(self) -> str:
        # One hash of the teacher as loaded serves the whole run: its parameters never change.
        # A stage-1 teacher in train mode moves its BatchNorm statistics, so LearnMasksModule
        # hashes it before training and its checkpoints keep those buffers.
        cached = getattr(self, "_teacher_sha256", None)
        if cached is None:
            teacher = self.frozen_teacher()
            assert teacher is not None
            cached = self._teacher_sha256 = state_fingerprint(teacher)
        return cached

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["maskd"] = self.meta
        if self.frozen_teacher() is None:
            return
        prefix = "net.teacher."
        state = checkpoint["state_dict"]
        kept = {prefix + name for name in self.teacher_state_kept()}
        for key in [k for k in state if k.startswith(prefix) and k not in kept]:
            del state[key]
        checkpoint["maskd_teacher"] = {"prefix": prefix, "sha256": self._teacher_fingerprint()}

    def check_teacher(self, info: Any, source: str = "this checkpoint") -> None:
        """Refuse a checkpoint's ``maskd_teacher`` record that names another teacher."""
        if not isinstance(info, Mapping) or self.frozen_teacher() is None:
            return
        found = self._teacher_fingerprint()
        if info.get("sha256") != found:
            raise UserValueError(
                f"{source} was written with a different teacher (state SHA-256 "
                f"{str(info.get('sha256'))[:12]}…, the teacher now loaded has {found[:12]}…); "
                "resume with the teacher weights the run started with"
            )

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        info = checkpoint.get("maskd_teacher")
        teacher = self.frozen_teacher()
        if info is None or teacher is None:
            return
        self.check_teacher(info)
        state = checkpoint["state_dict"]
        for key, value in teacher.state_dict().items():
            state.setdefault(info["prefix"] + key, value)  # entries the checkpoint kept win


class TrainModule(MaskdModule):
    """Train a task model (a teacher, or a plain student as the baseline)."""

    def __init__(self, model: nn.Module, task: Task, num_classes: int, **kwargs: Any) -> None:
        super().__init__(model, task, num_classes, **kwargs)

    @property
    def model(self) -> nn.Module:
        return self.net


class LearnMasksModule(MaskdModule):
    """Stage 1: learn receptive tokens on a frozen teacher (a ``maskd.TokenLearner``).

    Validation scores the teacher running on its masked features (the learner in eval
    mode), which shows how much of the task the masks keep.

    With the learner's ``teacher_mode="train"`` the teacher's BatchNorm running statistics
    move during training: the teacher is hashed as loaded (the resume check), and checkpoints
    keep its buffers so a resumed run continues from the moved statistics.
    """

    def __init__(self, learner: nn.Module, task: Task, num_classes: int, **kwargs: Any) -> None:
        super().__init__(learner, task, num_classes, **kwargs)
        if self._teacher_trains():
            self._teacher_fingerprint()

    @property
    def learner(self) -> nn.Module:
        return self.net

    def frozen_teacher(self) -> nn.Module | None:
        return self.net.teacher

    def _teacher_trains(self) -> bool:
        return getattr(self.net, "teacher_mode", "eval") == "train"

    def teacher_state_kept(self) -> set[str]:
        if not self._teacher_trains():
            return set()
        return {name for name, _ in self.net.teacher.named_buffers()}


class DistillModule(MaskdModule):
    """Stage 2: distill a student through a list of terms (a ``maskd.Distiller``).

    Only the student and the terms' own modules (align connectors, FGD's global blocks) are
    optimized; the teacher's and the tokens' parameters are excluded by identity even if
    something re-enabled their gradients. Validation scores the student alone.
    """

    def __init__(self, distiller: nn.Module, task: Task, num_classes: int, **kwargs: Any) -> None:
        super().__init__(distiller, task, num_classes, **kwargs)

    @property
    def distiller(self) -> nn.Module:
        return self.net

    def eval_model(self) -> nn.Module:
        return self.net.student

    def frozen_teacher(self) -> nn.Module | None:
        return self.net.teacher

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # The custom-mask warm-up counts optimizer steps (what configs mean), not forward
        # calls: they differ with gradient accumulation. global_step is restored on resume.
        set_step = getattr(self.net, "set_step", None)
        if callable(set_step):
            set_step(int(self.global_step))

    def _frozen_ids(self) -> set[int]:
        frozen = {id(p) for p in self.net.teacher.parameters()}
        for module in self.net.modules():
            if isinstance(module, ReceptiveTokens):
                frozen |= {id(p) for p in module.parameters()}
        return frozen

    def trainable_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        frozen = self._frozen_ids()
        for name, p in self.net.named_parameters():
            if p.requires_grad and id(p) not in frozen:
                yield name, p
