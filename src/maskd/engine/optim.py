"""Optimizers and per-iteration learning-rate schedules (METHOD.md's settings).

Every schedule is a multiplier on the base learning rate, evaluated per optimizer
step: a linear (or constant) warm-up from ``warmup_factor`` over ``warmup_steps``, then
``constant``, ``step`` (multiply by ``gamma`` at each milestone), ``cosine``
(down to ``min_lr``) or ``poly`` (``min_lr + (lr - min_lr)(1 - t)^power``, as the
segmentation recipes).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.optim.lr_scheduler import LambdaLR

from maskd._checks import check_number
from maskd.errors import UserValueError

__all__ = ["OptimSpec", "build_optimizer", "build_scheduler", "lr_factor", "param_groups"]


@dataclass
class OptimSpec:
    """Optimizer and learning-rate schedule.

    Args:
        name: ``sgd`` (momentum, as the detection/segmentation recipes), ``adam`` or
            ``adamw`` (stage 1 uses Adam).
        lr: base learning rate.
        momentum: SGD momentum.
        weight_decay: L2 weight decay (decoupled for ``adamw``).
        bias_lr_mult: learning-rate multiplier for the biases of layers other than
            normalisation layers (FCOS uses 2); mmcv's ``bias_lr_mult``.
        bias_weight_decay: apply weight decay to the biases of layers other than
            normalisation and depth-wise conv layers too (``false``: mmcv's
            ``bias_decay_mult=0``, as FCOS). See :func:`param_groups`.
        schedule: ``constant``, ``step``, ``cosine`` or ``poly``.
        milestones: for ``step``: fractions of the total steps (values < 1) or absolute
            step numbers (values >= 1) where the lr is multiplied by ``gamma``.
        gamma: step decay factor.
        min_lr: final lr of the cosine and poly schedules.
        power: exponent of the poly schedule.
        warmup_steps: warm-up length in optimizer steps (0: none).
        warmup_factor: lr multiplier at the first warm-up step.
        warmup: ``linear`` (from ``warmup_factor`` up to 1) or ``constant`` (``warmup_factor``
            throughout the warm-up), as mmcv's ``warmup='linear'`` / ``'constant'`` with
            ``warmup_ratio`` = ``warmup_factor``.
    """

    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    bias_lr_mult: float = 1.0
    bias_weight_decay: bool = True
    schedule: Literal["constant", "step", "cosine", "poly"] = "step"
    milestones: list[float] = field(default_factory=lambda: [0.67, 0.92])
    gamma: float = 0.1
    min_lr: float = 0.0
    power: float = 0.9
    warmup_steps: int = 0
    warmup_factor: float = 0.001
    warmup: Literal["linear", "constant"] = "linear"

    def __post_init__(self) -> None:
        check_number(self.lr, "optim.lr", low=0, low_open=True)
        check_number(self.momentum, "optim.momentum", low=0, high=1, high_open=True)
        check_number(self.weight_decay, "optim.weight_decay", low=0)
        check_number(self.bias_lr_mult, "optim.bias_lr_mult", low=0)
        check_number(self.gamma, "optim.gamma", low=0, low_open=True)
        check_number(self.min_lr, "optim.min_lr", low=0)
        check_number(self.power, "optim.power", low=0, low_open=True)
        check_number(self.warmup_steps, "optim.warmup_steps", low=0, integer=True)
        check_number(self.warmup_factor, "optim.warmup_factor", low=0, high=1, low_open=True)
        if self.warmup not in ("linear", "constant"):
            raise UserValueError(
                f"optim.warmup: {self.warmup!r} is not one of ['linear', 'constant']"
            )
        for i, m in enumerate(self.milestones):
            check_number(m, f"optim.milestones[{i}]", low=0, low_open=True)


# mmcv's normalisation layers (DefaultOptimizerConstructor.add_params' is_norm)
_NORMS = (_BatchNorm, _InstanceNorm, nn.GroupNorm, nn.LayerNorm)


def param_groups(
    params: Iterable[tuple[str, nn.Parameter]], spec: OptimSpec, model: nn.Module
) -> list[dict]:
    """Group named trainable parameters by learning rate and weight decay, as mmcv does.

    ``params`` are ``model.named_parameters()`` (or some of them): each name says which
    module of ``model`` owns the parameter. The rules of mmcv's
    ``DefaultOptimizerConstructor.add_params`` (``mmcv/runner/optimizer/default_constructor.py``):

    - a ``bias`` of any layer but a normalisation layer (BatchNorm, SyncBatchNorm,
      InstanceNorm, GroupNorm, LayerNorm) has its lr scaled by ``bias_lr_mult``;
    - weight decay: normalisation layers' weights and biases, and depth-wise convs' (a
      ``Conv2d`` with ``groups == in_channels``) keep the base decay (mmcv's
      ``norm_decay_mult`` / ``dwconv_decay_mult`` at their default 1); any other ``bias``
      loses it when ``bias_weight_decay`` is false;
    - everything else gets the base lr and decay.

    Weights, then biases, each split by their (lr, weight decay), form the groups: with the
    default settings these are the two groups of earlier versions, whose checkpoints then
    still resume. Only parameters with ``requires_grad`` are kept, so frozen modules (a
    teacher, receptive tokens in stage 2) can never be stepped by the optimizer.
    """
    groups: dict[tuple[bool, float, float], list[nn.Parameter]] = {}
    for name, p in params:
        if not p.requires_grad:
            continue
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        is_norm = isinstance(owner, _NORMS)
        is_dwconv = isinstance(owner, nn.Conv2d) and owner.in_channels == owner.groups
        is_bias = leaf == "bias"
        lr = spec.lr * spec.bias_lr_mult if is_bias and not is_norm else spec.lr
        decay = spec.weight_decay
        if is_bias and not (is_norm or is_dwconv) and not spec.bias_weight_decay:
            decay = 0.0
        groups.setdefault((is_bias, lr, decay), []).append(p)
    if not groups:
        raise UserValueError("no trainable parameters: every parameter has requires_grad=False")
    ordered = sorted(groups.items(), key=lambda item: item[0][0])  # stable: weights first
    return [{"params": ps, "lr": lr, "weight_decay": wd} for (_, lr, wd), ps in ordered]


def build_optimizer(
    params: Iterable[tuple[str, nn.Parameter]], spec: OptimSpec, model: nn.Module
) -> torch.optim.Optimizer:
    """Build the optimizer named by ``spec`` over trainable ``model.named_parameters()``."""
    groups = param_groups(params, spec, model)
    if spec.name == "sgd":
        return torch.optim.SGD(groups, lr=spec.lr, momentum=spec.momentum)
    if spec.name == "adam":
        return torch.optim.Adam(groups, lr=spec.lr)
    if spec.name == "adamw":
        return torch.optim.AdamW(groups, lr=spec.lr)
    raise UserValueError(f"optim.name: unknown optimizer {spec.name!r} (sgd, adam, adamw)")


def lr_factor(step: int, total_steps: int, spec: OptimSpec) -> float:
    """Learning-rate multiplier at optimizer step ``step`` (0-based) of ``total_steps``."""
    total = max(int(total_steps), 1)
    if spec.schedule == "constant":
        factor = 1.0
    elif spec.schedule == "step":
        bounds = [m * total if m < 1 else m for m in spec.milestones]
        factor = spec.gamma ** sum(step >= b for b in bounds)
    elif spec.schedule == "cosine":
        t = min(step / total, 1.0)
        floor = spec.min_lr / spec.lr if spec.lr > 0 else 0.0
        factor = floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t))
    elif spec.schedule == "poly":
        floor = spec.min_lr / spec.lr if spec.lr > 0 else 0.0
        factor = floor + (1.0 - floor) * max(1.0 - step / total, 0.0) ** spec.power
    else:
        raise UserValueError(f"optim.schedule: unknown schedule {spec.schedule!r}")
    if spec.warmup_steps > 0 and step < spec.warmup_steps:
        alpha = 0.0 if spec.warmup == "constant" else step / spec.warmup_steps
        factor *= spec.warmup_factor * (1.0 - alpha) + alpha
    return factor


def build_scheduler(
    optimizer: torch.optim.Optimizer, spec: OptimSpec, total_steps: int
) -> LambdaLR:
    """A per-step ``LambdaLR`` applying :func:`lr_factor` to every parameter group."""
    return LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, spec))
