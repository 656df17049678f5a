"""Capture, and optionally replace, the outputs of named sub-modules of any ``nn.Module``.

A *layer* is a dotted path from ``model.named_modules()`` (``"backbone.fpn"``). Its output
may be a tensor, a list/tuple of tensors or a dict of tensors; each tensor becomes one
feature *level*, named ``path`` for a lone tensor and ``path:key`` otherwise
(``backbone.fpn:0`` … ``backbone.fpn:pool``; ``path:0``, ``path:1`` for sequences).

:class:`FeatureTaps` is this level view over a :class:`~maskd.recorder.Recorder`, which holds
the hooks: they exist only inside a ``with`` block, so nothing outlives a forward. The
helpers :func:`resize_records` / :func:`resized_batch` read what a torchvision detector's
``transform`` made of the batch (resized image sizes, padded size, resized targets).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from maskd.errors import UserRuntimeError, UserTypeError, UserValueError
from maskd.recorder import Record, Recorder, resolve_layers

__all__ = [
    "RESIZE",
    "FeatureTaps",
    "ResizedBatch",
    "detection_transform",
    "eval_mode",
    "example_images",
    "flatten_output",
    "level_key",
    "level_names",
    "model_device",
    "probe_levels",
    "rebuild_output",
    "recorded_levels",
    "resize_records",
    "resized_batch",
    "resolve_layers",
]

Replace = Callable[[str, Tensor], Tensor]


def flatten_output(path: str, output: Any) -> list[tuple[str, Tensor]]:
    """Split a layer's output into named levels, in output order.

    Raises:
        TypeError: the output, or one of its elements, is not a tensor.
    """
    if isinstance(output, Tensor):
        return [(path, output)]
    if isinstance(output, Mapping):
        items = [(f"{path}:{key}", value) for key, value in output.items()]
    elif isinstance(output, list | tuple):
        items = [(f"{path}:{i}", value) for i, value in enumerate(output)]
    else:
        raise UserTypeError(
            f"layer {path!r} returned {type(output).__name__}; a tapped layer must return a "
            "tensor, a list/tuple of tensors or a dict of tensors"
        )
    if not items:
        raise UserTypeError(f"layer {path!r} returned an empty {type(output).__name__}")
    for name, value in items:
        if not isinstance(value, Tensor):
            raise UserTypeError(
                f"level {name!r} of layer {path!r} is {type(value).__name__}, not a tensor"
            )
    return items


def level_key(path: str, name: str) -> str:
    """The key part of a level name of layer ``path``: ``"0"`` for ``"path:0"``, the inverse
    of :func:`flatten_output`'s naming (a lone tensor's level, ``path`` itself, has none).

    Raises:
        ValueError: ``name`` is not a level name of layer ``path``.
    """
    prefix = f"{path}:"
    if not name.startswith(prefix):
        raise ValueError(f"{name!r} is not a level name of layer {path!r}")
    return name[len(prefix) :]


def level_names(path: str, output: Any) -> list[str]:
    """The level names :func:`flatten_output` gives a layer's output."""
    return [name for name, _ in flatten_output(path, output)]


def rebuild_output(output: Any, tensors: Sequence[Tensor]) -> Any:
    """Put new tensors back into the structure of ``output`` (same container type and keys)."""
    if isinstance(output, Tensor):
        return tensors[0]
    if isinstance(output, Mapping):
        rebuilt = OrderedDict(zip(output.keys(), tensors, strict=True))
        return rebuilt if type(output) in (dict, OrderedDict) else type(output)(rebuilt)
    if isinstance(output, tuple) and hasattr(output, "_fields"):  # named tuple
        return type(output)(*tensors)
    return type(output)(tensors)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every sub-module in eval mode, restoring each one's own flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, flag in flags:
            module.training = flag


def recorded_levels(recorder: Recorder, paths: Sequence[str]) -> OrderedDict[str, Tensor]:
    """The levels of the recorded outputs of ``paths`` (records named by their layer path).

    Returns:
        ``{level name: tensor}``, layers in the order of ``paths``, each in output order.

    Raises:
        RuntimeError: a layer did not run in the recorder's last forward.
        TypeError: a recorded output is not a tensor or a list/tuple/dict of tensors.
    """
    return OrderedDict(item for path in paths for item in flatten_output(path, recorder[path]))


def _replacer(path: str, replace: Replace) -> Callable[[Any], Any]:
    """A whole-output replacement that replaces each level of layer ``path`` by ``replace``."""

    def replace_levels(output: Any) -> Any:
        new = []
        for name, value in flatten_output(path, output):
            replaced = replace(name, value)
            if not isinstance(replaced, Tensor) or replaced.shape != value.shape:
                found = tuple(replaced.shape) if isinstance(replaced, Tensor) else replaced
                raise UserValueError(
                    f"replacement for level {name!r} must be a tensor of shape "
                    f"{tuple(value.shape)}, got {found}"
                )
            new.append(replaced)
        return rebuild_output(output, new)

    return replace_levels


class FeatureTaps:
    """Record (and optionally replace) the outputs of named layers, as named levels.

    Usage::

        taps = FeatureTaps(model, ["backbone.fpn"])
        with taps:
            losses = model(images, targets)
            feats = taps.features  # {"backbone.fpn:0": [N, C, H, W], ...}

    or ``taps.run(images, targets)``, which also registers the hooks for the call. Each call
    of ``model`` starts a fresh record. The hooks are those of :attr:`recorder`, one
    :class:`~maskd.recorder.Recorder` with one output record per layer, named by its path.

    Args:
        model: any ``nn.Module``.
        layers: dotted paths of the layers to tap, relative to ``model``.
        replace: optional ``fn(level_name, tensor) -> tensor``; each level of a tapped
            layer's output is replaced by ``fn``'s result, so the forward continues with it.
            ``features`` then holds the *original* tensors.
        stop: end the forward as soon as every tapped layer has produced its output (the
            rest of the model never runs); :meth:`run` then returns ``None``.

    Raises:
        ValueError: a layer path is unknown (closest names listed) or repeated.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[str],
        replace: Replace | None = None,
        stop: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise UserTypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if replace is not None and not callable(replace):
            raise UserTypeError(f"replace must be callable or None, got {type(replace).__name__}")
        self.model = model
        self.modules = resolve_layers(model, layers)
        self.layers: list[str] = list(self.modules)
        self.replace = replace
        self.stop = bool(stop)
        self.recorder = Recorder(
            model,
            {
                path: Record(path, replace=None if replace is None else _replacer(path, replace))
                for path in self.layers
            },
            stop=self.stop,
        )

    @property
    def active(self) -> bool:
        """Whether the hooks are currently registered."""
        return self.recorder.active

    @property
    def features(self) -> OrderedDict[str, Tensor]:
        """``{level name: tensor}`` of the last forward, layers in the order they were named."""
        return recorded_levels(self.recorder, [p for p in self.layers if p in self.recorder])

    def __enter__(self) -> FeatureTaps:
        self.recorder.__enter__()
        return self

    def __exit__(self, *exc: Any) -> bool:
        return self.recorder.__exit__(*exc)

    def clear(self) -> None:
        """Drop captured features (and the autograd graph they hold)."""
        self.recorder.clear()

    def run(self, *args: Any, **kwargs: Any) -> Any:
        """Call the model with the hooks active; return its output, or ``None`` if stopped.

        The hooks are registered for the call if the taps are not already active.

        Raises:
            RuntimeError: the forward finished without running every tapped layer.
        """
        output = self.recorder.run(*args, **kwargs)
        missing = self.recorder.missing()
        if missing:
            raise UserRuntimeError(
                f"layers {missing} of {type(self.model).__name__} did not run during the forward"
            )
        return output

    def levels(self) -> dict[str, list[str]]:
        """``{layer path: [level names]}`` of the last forward, in output order."""
        return {
            path: level_names(path, self.recorder[path]) if path in self.recorder else []
            for path in self.layers
        }


RESIZE = "resize/transform"
"""The record :func:`resize_records` names (a name no layer path of a model takes)."""


@dataclass(frozen=True)
class ResizedBatch:
    """What a torchvision-style detection ``transform`` made of a batch.

    Attributes:
        image_sizes: ``(H_i, W_i)`` of each resized image, before padding.
        padded: ``(H, W)`` of the padded batch tensor.
        targets: the transform's targets (boxes in resized coordinates), or ``None``.
    """

    image_sizes: list[tuple[int, int]]
    padded: tuple[int, int]
    targets: Any = None


def detection_transform(model: nn.Module) -> nn.Module | None:
    """The model's resizing transform when it follows torchvision's detection convention.

    Torchvision detectors resize the batch inside ``model.transform``, whose output is
    ``(ImageList, targets)``; an ``ImageList`` carries ``image_sizes`` and padded ``tensors``.
    """
    transform = getattr(model, "transform", None)
    if isinstance(transform, nn.Module) and hasattr(transform, "min_size"):
        return transform
    return None


def resize_records(model: nn.Module) -> dict[str, Record]:
    """``{RESIZE: output of model.transform}`` for a torchvision-style detector, else ``{}``."""
    return {RESIZE: Record("transform")} if detection_transform(model) is not None else {}


def resized_batch(recorder: Recorder) -> ResizedBatch | None:
    """The resized batch from a :func:`resize_records` record; ``None`` when there is none."""
    output = recorder.get(RESIZE)
    image_list = output[0] if isinstance(output, tuple) and output else None
    if not (hasattr(image_list, "image_sizes") and hasattr(image_list, "tensors")):
        return None
    sizes = [(int(h), int(w)) for h, w in image_list.image_sizes]
    h, w = image_list.tensors.shape[-2:]
    return ResizedBatch(sizes, (int(h), int(w)), output[1] if len(output) > 1 else None)


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter or buffer (CPU for a model with neither)."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def example_images(model: nn.Module, size: int = 128) -> Tensor:
    """The default dry-run input: one black ``[1, 3, size, size]`` image on the model's device.

    Torchvision detectors accept a batched tensor as well as a list of images, and resize it
    with their own transform, so one square image serves detectors and segmenters alike.
    """
    return torch.zeros(1, 3, size, size, device=model_device(model))


def probe_levels(
    model: nn.Module, layers: Sequence[str], example_input: Any = None
) -> tuple[OrderedDict[str, Tensor], dict[str, list[str]]]:
    """Dry run: the features of every tapped level on one input, without side effects.

    The model runs in eval mode (every module's own mode restored afterwards) under
    ``torch.no_grad()``, and stops as soon as the last tapped layer has produced its output,
    so heads and post-processing never run and no running statistic changes.

    Args:
        model: the model to probe.
        layers: dotted layer paths.
        example_input: what to call ``model`` with; a tuple is unpacked into positional
            arguments. ``None`` uses :func:`example_images`.

    Returns:
        ``(features, levels)``: ``{level name: [N, C, H, W]}`` and ``{layer: [level names]}``.
    """
    taps = FeatureTaps(model, layers, stop=True)
    if example_input is None:
        example_input = example_images(model)
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    with torch.no_grad(), eval_mode(model):
        taps.run(*args)
    features = taps.features
    for name, value in features.items():
        if value.dim() != 4:
            raise UserValueError(
                f"level {name!r} must be a [N, C, H, W] feature map, got shape {tuple(value.shape)}"
            )
    return features, taps.levels()
