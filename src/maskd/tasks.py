"""Task-model wrappers: give segmenters the ``forward(images, targets)`` contract of detectors."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maskd.errors import UserTypeError, UserValueError

__all__ = ["SegmentationTask", "stack_images"]


def stack_images(images: Tensor | Sequence[Tensor], name: str = "images") -> Tensor:
    """Return images as one ``[N, 3, H, W]`` tensor (a list of ``[3, H, W]`` is stacked).

    Raises:
        TypeError: not a tensor or a list/tuple of tensors.
        ValueError: wrong dimensions, or list images of different sizes.
    """
    if isinstance(images, Tensor):
        if images.dim() != 4:
            raise UserValueError(f"{name} must be [N, 3, H, W], got shape {tuple(images.shape)}")
        return images
    if not isinstance(images, list | tuple) or not images:
        raise UserTypeError(
            f"{name} must be a [N, 3, H, W] tensor or a non-empty list of [3, H, W] tensors, "
            f"got {type(images).__name__}"
        )
    shapes = []
    for i, img in enumerate(images):
        if not isinstance(img, Tensor) or img.dim() != 3:
            found = tuple(img.shape) if isinstance(img, Tensor) else type(img).__name__
            raise UserValueError(f"{name}[{i}] must be a [3, H, W] tensor, got {found}")
        shapes.append(tuple(img.shape))
    if len(set(shapes)) > 1:
        raise UserValueError(f"{name} must all have the same size to be batched, got {shapes}")
    return torch.stack(list(images))


class SegmentationTask(nn.Module):
    """Wrap a torchvision-style segmenter into the task-model contract.

    The wrapped ``model(x)`` returns logits ``[N, K, h, w]`` or a dict with ``"out"`` (and
    optionally ``"aux"``) logits, as torchvision's DeepLabV3 / FCN / LRASPP do.

    - training mode: ``forward(images, targets [N, H, W] int64)`` returns
      ``{"loss_seg": CE(out), "loss_aux": aux_weight * CE(aux)}`` (``loss_aux`` only when the
      model has an ``"aux"`` output and ``aux_weight > 0``); logits are bilinearly resized to
      the target size and pixels equal to ``ignore_index`` are ignored.
    - eval mode: ``forward(images)`` returns the main logits ``[N, K, H, W]`` at input size.

    Layer paths of the wrapped model gain the ``model.`` prefix (``"model.classifier.4"``).

    Args:
        model: the segmenter.
        num_classes: ``K``; the logits must have this many channels.
        ignore_index: target value of unlabelled pixels.
        aux_weight: weight of the auxiliary head's cross-entropy.
    """

    def __init__(
        self, model: nn.Module, num_classes: int, ignore_index: int = 255, aux_weight: float = 0.4
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise UserTypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise UserValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
            raise UserTypeError(f"ignore_index must be an int, got {ignore_index!r}")
        if not isinstance(aux_weight, int | float) or aux_weight < 0:
            raise UserValueError(f"aux_weight must be a number >= 0, got {aux_weight!r}")
        self.model = model
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.aux_weight = float(aux_weight)

    def _logits(self, x: Tensor) -> dict[str, Tensor]:
        out = self.model(x)
        if isinstance(out, Tensor):
            out = {"out": out}
        if not isinstance(out, Mapping) or "out" not in out:
            found = list(out) if isinstance(out, Mapping) else type(out).__name__
            raise UserTypeError(
                f"the segmenter must return logits or a dict with an 'out' entry, got {found}"
            )
        for key, logits in out.items():
            if not isinstance(logits, Tensor) or logits.dim() != 4:
                continue
            if logits.shape[1] != self.num_classes:
                raise UserValueError(
                    f"segmenter output {key!r} has {logits.shape[1]} channels but "
                    f"num_classes={self.num_classes} (shape {tuple(logits.shape)})"
                )
        return dict(out)

    def _cross_entropy(self, logits: Tensor, targets: Tensor) -> Tensor:
        if logits.shape[-2:] != targets.shape[-2:]:
            logits = F.interpolate(
                logits, size=targets.shape[-2:], mode="bilinear", align_corners=False
            )
        if not bool((targets != self.ignore_index).any()):
            # Mean over zero pixels is NaN; an all-ignored batch contributes nothing instead.
            return logits.sum() * 0.0
        return F.cross_entropy(logits, targets, ignore_index=self.ignore_index)

    def forward(
        self, images: Tensor | Sequence[Tensor], targets: Tensor | None = None
    ) -> dict[str, Tensor] | Tensor:
        """Losses in training mode, logits ``[N, K, H, W]`` at input size in eval mode."""
        x = stack_images(images)
        out = self._logits(x)
        if not self.training:
            logits = out["out"]
            if logits.shape[-2:] != x.shape[-2:]:
                logits = F.interpolate(
                    logits, size=x.shape[-2:], mode="bilinear", align_corners=False
                )
            return logits
        targets = self._check_targets(targets, x)
        losses = {"loss_seg": self._cross_entropy(out["out"], targets)}
        if "aux" in out and self.aux_weight > 0:
            losses["loss_aux"] = self.aux_weight * self._cross_entropy(out["aux"], targets)
        return losses

    def _check_targets(self, targets: Tensor | None, x: Tensor) -> Tensor:
        if targets is None:
            raise UserValueError("targets [N, H, W] are required in training mode")
        if isinstance(targets, list | tuple):
            targets = torch.stack(list(targets))
        if not isinstance(targets, Tensor) or targets.dim() != 3:
            found = tuple(targets.shape) if isinstance(targets, Tensor) else type(targets).__name__
            raise UserValueError(f"targets must be an int64 [N, H, W] tensor, got {found}")
        if targets.shape[0] != x.shape[0]:
            raise UserValueError(
                f"targets hold {targets.shape[0]} masks for {x.shape[0]} images "
                f"(targets {tuple(targets.shape)}, images {tuple(x.shape)})"
            )
        if targets.dtype != torch.long:
            if targets.is_floating_point():
                raise UserTypeError(f"targets must be an integer tensor, got dtype {targets.dtype}")
            targets = targets.long()
        valid = targets[targets != self.ignore_index]
        if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= self.num_classes):
            raise UserValueError(
                f"target labels must lie in [0, {self.num_classes - 1}] or equal "
                f"ignore_index={self.ignore_index}, found {int(valid.min())}..{int(valid.max())}"
            )
        return targets
