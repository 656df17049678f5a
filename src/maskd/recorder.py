"""Record what named sub-modules of a model see and return during one forward.

Every part of the package that reads a layer (stage-1 masking, stage-2 features, head KD,
the detectors' resized batch, the visualiser) goes through one :class:`Recorder`::

    rec = Recorder(teacher, {"fpn": Record("backbone.fpn"), "resize": Record("transform")},
                   stop=True)
    with torch.no_grad(), rec:
        teacher(images)          # ends right after backbone.fpn; no error reaches the caller
    rec["fpn"]                   # the FPN's OrderedDict, as the module returned it

A :class:`Record` names a layer path (``named_modules()`` name) and what to take from it:

- ``"output"``: what the module returned (a forward hook);
- ``"input"``: the module's first positional argument, as the call starts (a pre-hook);
- ``"pre"``: the tuple of all positional arguments, as the call starts (a pre-hook);
- ``"return"``: what a method returned; the path names the method after its module
  (``"roi_heads.select_training_samples"``), which is wrapped on the instance while the
  recorder is active.

Values are kept as they are (a dict stays the same dict, a tuple the same tuple). With
``replace=fn`` the forward continues with ``fn(value)`` instead (the new output, first
argument or argument tuple) while the record keeps the original.

Hooks exist only inside the ``with`` block, so nothing outlives it, also on an exception.
Each call of the model starts a fresh record (one pre-hook on the root clears it); the
values stay readable after the block until :meth:`Recorder.clear` or the next call.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn
from torch.utils.hooks import RemovableHandle

from maskd.errors import UserKeyError, UserRuntimeError, UserTypeError, UserValueError

__all__ = ["RECORD_KINDS", "Record", "RecordKind", "Recorder", "resolve_layers"]

RecordKind = Literal["output", "input", "pre", "return"]
RECORD_KINDS: tuple[str, ...] = ("output", "input", "pre", "return")


class _StopForward(Exception):
    """Raised from a hook once every record was taken, to skip the rest of a forward."""

    def __init__(self, recorder: Recorder) -> None:
        super().__init__("forward stopped after the last record")
        self.recorder = recorder


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


def _module_path(record: Record) -> str:
    return record.path.rpartition(".")[0] if record.what == "return" else record.path


def _method(record: Record) -> str:
    return record.path.rpartition(".")[2]


class _MethodWrap:
    """A method of one module instance wrapped to pass its return value through ``hook``;
    ``remove()`` restores the instance as it was."""

    def __init__(self, module: nn.Module, method: str, hook: Callable[[Any], Any]) -> None:
        self.module, self.method = module, method
        self._own = method in vars(module)  # an instance attribute to put back on remove
        self._previous = vars(module).get(method)
        original = getattr(module, method)

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            return hook(original(*args, **kwargs))

        object.__setattr__(module, method, wrapped)

    def remove(self) -> None:
        if self._own:
            object.__setattr__(self.module, self.method, self._previous)
        else:
            object.__delattr__(self.module, self.method)


@dataclass(frozen=True)
class Record:
    """What to record from one layer.

    Args:
        path: dotted ``named_modules()`` path of the layer, relative to the recorded model
            (for ``"return"``: that path, a dot and the method's name).
        what: ``"output"`` (the return value), ``"input"`` (the first positional argument),
            ``"pre"`` (all positional arguments as a tuple) or ``"return"`` (what the
            method returned).
        replace: optional ``fn(value) -> value``; the forward continues with its result.
    """

    path: str
    what: RecordKind = "output"
    replace: Callable[[Any], Any] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.path, str):
            raise UserTypeError(f"a record's layer path must be a str, got {self.path!r}")
        if self.what not in RECORD_KINDS:
            raise UserValueError(
                f"a record takes one of {list(RECORD_KINDS)} of a layer, got {self.what!r}"
            )
        if self.replace is not None and not callable(self.replace):
            raise UserTypeError(
                f"replace must be callable or None, got {type(self.replace).__name__}"
            )


class Recorder:
    """Hooks that record (and optionally replace) named values of one model's forward.

    Args:
        model: any ``nn.Module``.
        records: ``{name: Record}``; ``rec[name]`` is the value recorded in the last forward.
        stop: end the forward as soon as every record was taken (the rest of the model never
            runs); the ``with`` block swallows that stop, so the caller sees no error.

    Raises:
        ValueError: ``records`` is empty or names an unknown layer (closest names listed).
        TypeError: ``model`` is not a module or a record is not a :class:`Record`.
    """

    def __init__(self, model: nn.Module, records: Mapping[str, Record], stop: bool = False) -> None:
        if not isinstance(model, nn.Module):
            raise UserTypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(records, Mapping) or not records:
            raise UserValueError(
                f"records must be a non-empty mapping {{name: Record}}, got {records!r}"
            )
        for name, record in records.items():
            if not isinstance(record, Record):
                raise UserTypeError(
                    f"record {name!r} must be a maskd.recorder.Record, got {type(record).__name__}"
                )
        self.model = model
        self.records: dict[str, Record] = dict(records)
        self.stop = bool(stop)
        paths = list(dict.fromkeys(_module_path(r) for r in self.records.values()))
        self.modules: dict[str, nn.Module] = resolve_layers(model, paths)
        for name, record in self.records.items():
            if record.what == "return":
                module, method = self.modules[_module_path(record)], _method(record)
                if not callable(getattr(module, method, None)):
                    raise UserValueError(
                        f"record {name!r}: {type(module).__name__} at {_module_path(record)!r} "
                        f"has no method {method!r}"
                    )
        self.stopped = False
        self._values: dict[str, Any] = {}
        self._handles: list[RemovableHandle | _MethodWrap] = []

    def __repr__(self) -> str:
        parts = ", ".join(f"{n}={r.what}:{r.path}" for n, r in self.records.items())
        return f"Recorder({type(self.model).__name__}, {parts}, stop={self.stop})"

    @property
    def active(self) -> bool:
        """Whether the hooks are registered (inside the ``with`` block)."""
        return bool(self._handles)

    def __enter__(self) -> Recorder:
        if self._handles:
            raise RuntimeError(
                f"{self!r} is already active; one recorder cannot be nested in itself"
            )
        self.clear()
        self._handles.append(self.model.register_forward_pre_hook(self._on_call))
        try:
            for name, record in self.records.items():
                module = self.modules[_module_path(record)]
                if record.what == "return":
                    handle: RemovableHandle | _MethodWrap = _MethodWrap(
                        module, _method(record), self._return_hook(name, record)
                    )
                elif record.what == "output":
                    handle = module.register_forward_hook(self._output_hook(name, record))
                else:
                    handle = module.register_forward_pre_hook(self._pre_hook(name, record))
                self._handles.append(handle)
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> bool:
        self._remove()
        return isinstance(exc, _StopForward) and exc.recorder is self

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def clear(self) -> None:
        """Drop the recorded values (and any autograd graph they hold)."""
        self._values = {}
        self.stopped = False

    def _on_call(self, module: nn.Module, args: Any) -> None:
        self.clear()

    def _take(self, name: str, record: Record, value: Any) -> None:
        if name in self._values:
            raise UserRuntimeError(
                f"layer {record.path!r} ran twice in one forward (record {name!r}); a recorded "
                "layer must run once per forward"
            )
        self._values[name] = value

    def _maybe_stop(self) -> None:
        if self.stop and len(self._values) == len(self.records):
            self.stopped = True
            raise _StopForward(self)

    def _pass(self, name: str, record: Record, value: Any) -> Any:
        """Record a returned value; what the forward continues with (replaced or as is)."""
        self._take(name, record, value)
        result = value if record.replace is None else record.replace(value)
        self._maybe_stop()
        return result

    def _output_hook(self, name: str, record: Record) -> Callable[[nn.Module, Any, Any], Any]:
        return lambda module, args, output: self._pass(name, record, output)

    def _return_hook(self, name: str, record: Record) -> Callable[[Any], Any]:
        return lambda value: self._pass(name, record, value)

    def _pre_hook(self, name: str, record: Record) -> Callable[[nn.Module, Any], Any]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> Any:
            if record.what == "input":
                if not args:
                    raise UserRuntimeError(
                        f"layer {record.path!r} was called without a positional argument, so "
                        f"record {name!r} has no input to take; record what='pre' instead"
                    )
                self._take(name, record, args[0])
                result = None
                if record.replace is not None:
                    result = (record.replace(args[0]), *args[1:])
            else:
                self._take(name, record, args)
                result = None
                if record.replace is not None:
                    result = record.replace(args)
                    if not isinstance(result, tuple):
                        raise UserTypeError(
                            f"replace of record {name!r} (what='pre') must return the tuple of "
                            f"positional arguments, got {type(result).__name__}"
                        )
            self._maybe_stop()
            return result

        return hook

    def run(self, *args: Any, **kwargs: Any) -> Any:
        """Call the model with the hooks on; its output, or ``None`` when ``stop`` ended it.

        The hooks are registered for the call when the recorder is not already active.
        """
        if not self._handles:
            with self:
                return self.run(*args, **kwargs)
        try:
            return self.model(*args, **kwargs)
        except _StopForward as stop:
            if stop.recorder is not self:
                raise
            return None

    def __contains__(self, name: object) -> bool:
        """Whether ``name`` was recorded in the last forward."""
        return name in self._values

    def __getitem__(self, name: str) -> Any:
        """The value of record ``name`` from the last forward.

        Raises:
            KeyError: ``name`` is not a record.
            RuntimeError: its layer did not run in the last forward.
        """
        if name in self._values:
            return self._values[name]
        if name not in self.records:
            raise UserKeyError(f"no record {name!r}; records: {list(self.records)}")
        record = self.records[name]
        raise UserRuntimeError(
            f"record {name!r} ({record.what} of layer {record.path!r}) was not taken: the layer "
            f"did not run in the last forward of {type(self.model).__name__}"
        )

    def get(self, name: str, default: Any = None) -> Any:
        """The value of record ``name`` from the last forward, or ``default``."""
        return self._values.get(name, default)

    def missing(self) -> list[str]:
        """Names of the records not taken in the last forward, in record order."""
        return [name for name in self.records if name not in self._values]
