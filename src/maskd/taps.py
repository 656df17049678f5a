"""Capture, and optionally replace, the outputs of named sub-modules of any ``nn.Module``.

A *layer* is a dotted path from ``model.named_modules()`` (``"backbone.fpn"``). Its output
may be a tensor, a list/tuple of tensors or a dict of tensors; each tensor becomes one
feature *level*, named ``path`` for a lone tensor and ``path:key`` otherwise
(``backbone.fpn:0`` … ``backbone.fpn:pool``; ``path:0``, ``path:1`` for sequences).

Hooks exist only inside a ``with FeatureTaps(...)`` block, so nothing outlives a forward.
"""

from __future__ import annotations

import difflib
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from maskd.errors import UserRuntimeError, UserTypeError, UserValueError

__all__ = [
    "FeatureTaps",
    "eval_mode",
    "example_images",
    "flatten_output",
    "level_names",
    "model_device",
    "probe_levels",
    "rebuild_output",
    "resolve_layers",
]

Replace = Callable[[str, Tensor], Tensor]


class _StopForward(Exception):
    """Raised from a hook once every tapped layer has fired, to skip the rest of a forward."""


def resolve_layers(model: nn.Module, layers: Sequence[str]) -> dict[str, nn.Module]:
    """Map each dotted layer path to its sub-module, in the order given.

    Raises:
        TypeError: ``layers`` is a bare string or holds non-strings.
        ValueError: ``layers`` is empty, repeats a path, or names a module that does not exist
            (the closest valid names are listed).
    """
    if isinstance(layers, str) or not isinstance(layers, Sequence):
        raise UserTypeError(
            f"layers must be a sequence of layer paths such as ['backbone.fpn'], got {layers!r}"
        )
    if len(layers) == 0:
        raise UserValueError("layers is empty: name at least one layer to tap")
    modules = dict(model.named_modules())
    found: dict[str, nn.Module] = {}
    for path in layers:
        if not isinstance(path, str):
            raise UserTypeError(
                f"layer paths must be strings, got {path!r} ({type(path).__name__})"
            )
        if path in found:
            raise UserValueError(f"layer {path!r} is listed twice in {list(layers)}")
        if path not in modules:
            close = difflib.get_close_matches(path, [n for n in modules if n], n=5, cutoff=0.5)
            hint = f"; closest valid names: {close}" if close else ""
            raise UserValueError(
                f"unknown layer {path!r} in {type(model).__name__}{hint}. "
                "Layer paths are names from model.named_modules()."
            )
        found[path] = modules[path]
    return found


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


class FeatureTaps:
    """Forward hooks that record (and optionally replace) the outputs of named layers.

    Usage::

        taps = FeatureTaps(model, ["backbone.fpn"])
        with taps:
            losses = model(images, targets)
            feats = taps.features  # {"backbone.fpn:0": [N, C, H, W], ...}

    or ``taps.run(images, targets)``, which also registers the hooks for the call and is
    the way to use ``stop=True``. Each call of ``model`` starts a fresh capture.

    Args:
        model: any ``nn.Module``.
        layers: dotted paths of the layers to tap, relative to ``model``.
        replace: optional ``fn(level_name, tensor) -> tensor``; each level of a tapped
            layer's output is replaced by ``fn``'s result, so the forward continues with it.
            ``features`` then holds the *original* tensors.
        stop: when true, :meth:`run` ends the forward as soon as every tapped layer has
            produced its output (the rest of the model never runs).

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
        self.features: OrderedDict[str, Tensor] = OrderedDict()
        self._outputs: dict[str, list[tuple[str, Tensor]]] = {}
        self._handles: list[RemovableHandle] = []

    @property
    def active(self) -> bool:
        """Whether the hooks are currently registered."""
        return bool(self._handles)

    def __enter__(self) -> FeatureTaps:
        if self._handles:
            raise RuntimeError("FeatureTaps is already active; nested use of one tap object")
        self.clear()
        # Each call of the model starts a fresh capture.
        self._handles.append(self.model.register_forward_pre_hook(lambda *_: self.clear()))
        for path, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._hook(path)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def clear(self) -> None:
        """Drop captured features (and the autograd graph they hold)."""
        self.features = OrderedDict()
        self._outputs = {}

    def _hook(self, path: str) -> Callable[[nn.Module, Any, Any], Any]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> Any:
            if path in self._outputs:
                raise UserRuntimeError(
                    f"layer {path!r} ran twice in one forward; taps need layers that run once"
                )
            levels = flatten_output(path, output)
            self._outputs[path] = levels
            self._collect()
            result = None
            if self.replace is not None:
                new = []
                for name, value in levels:
                    replaced = self.replace(name, value)
                    if not isinstance(replaced, Tensor) or replaced.shape != value.shape:
                        found = tuple(replaced.shape) if isinstance(replaced, Tensor) else replaced
                        raise UserValueError(
                            f"replacement for level {name!r} must be a tensor of shape "
                            f"{tuple(value.shape)}, got {found}"
                        )
                    new.append(replaced)
                result = rebuild_output(output, new)
            if self.stop and len(self._outputs) == len(self.layers):
                raise _StopForward
            return result

        return hook

    def _collect(self) -> None:
        # Keep levels in the order the layers were named, whatever order they ran in.
        self.features = OrderedDict(
            (name, value)
            for path in self.layers
            if path in self._outputs
            for name, value in self._outputs[path]
        )

    def run(self, *args: Any, **kwargs: Any) -> Any:
        """Call the model with the hooks active; return its output, or ``None`` if stopped.

        The hooks are registered for the call if the taps are not already active.

        Raises:
            RuntimeError: the forward finished without running every tapped layer.
        """
        if not self._handles:
            with self:
                return self.run(*args, **kwargs)
        try:
            output = self.model(*args, **kwargs)
        except _StopForward:
            return None
        missing = [p for p in self.layers if p not in self._outputs]
        if missing:
            raise UserRuntimeError(
                f"layers {missing} of {type(self.model).__name__} did not run during the forward"
            )
        return output

    def levels(self) -> dict[str, list[str]]:
        """``{layer path: [level names]}`` of the last forward, in output order."""
        return {path: [name for name, _ in self._outputs.get(path, [])] for path in self.layers}


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
