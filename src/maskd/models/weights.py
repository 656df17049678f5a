"""Loading weights from disk: ImageNet backbones and whole-model checkpoints.

Both loaders are strict: every parameter and buffer of the target must be found with the
right shape, and every checkpoint entry must be used, except

- ``num_batches_tracked`` counters, which ``FrozenBatchNorm2d`` does not have and which do
  not change any output, and
- the prefixes passed as ``ignore_prefixes`` (an ImageNet classifier: ``fc.`` for ResNets,
  ``classifier.`` for MobileNetV3).

Checkpoints are read with ``torch.load(weights_only=True)``: tensors, containers and plain
Python values only, never arbitrary pickled objects.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

from torch import Tensor, nn

from maskd.errors import UserTypeError, UserValueError
from maskd.torch_files import load_file

_COUNTER = "num_batches_tracked"
_SHOWN = 12


def read_state_dict(
    path: str | Path, *, argument: str = "weights", prefix: str = ""
) -> dict[str, Tensor]:
    """Read a state dict from ``path``.

    Accepted layouts: a plain ``{name: Tensor}`` mapping; a mapping holding one under
    ``"state_dict"`` (Lightning and many training scripts) or ``"model"`` (torchvision's
    reference scripts). Only the entries whose key starts with ``prefix`` are kept (and
    checked: the rest of a training checkpoint may hold other modules' extra state); the
    keys are left untouched.
    """
    obj = load_file(path, argument=argument)
    if not isinstance(obj, Mapping):
        raise UserTypeError(
            f"{argument}: {str(path)!r} holds a {type(obj).__name__}, not a state dict"
        )
    for key in ("state_dict", "model"):
        inner = obj.get(key)
        if isinstance(inner, Mapping) and not isinstance(inner, Tensor):
            obj = inner
            break
    obj = {k: v for k, v in obj.items() if not isinstance(k, str) or k.startswith(prefix)}
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise UserTypeError(
            f"{argument}: {str(path)!r} is not a state dict (a mapping of names to tensors); "
            f"entries that are not tensors: {_show(map(str, bad))}"
        )
    return dict(obj)


def load_backbone_weights(
    module: nn.Module,
    path: str | Path,
    ignore_prefixes: Iterable[str] = (),
    *,
    argument: str = "backbone_weights",
) -> None:
    """Copy torchvision-format backbone weights (e.g. an ImageNet ResNet) into ``module``.

    Keys starting with one of ``ignore_prefixes`` (the ImageNet classifier) are skipped;
    everything else must match ``module.state_dict()`` exactly. Raises ValueError listing
    missing, unexpected and mis-shaped keys on any mismatch.
    """
    state = read_state_dict(path, argument=argument)
    prefixes = tuple(ignore_prefixes)
    state = {k: v for k, v in state.items() if not k.startswith(prefixes)}
    _strict_load(module, state, f"{argument} {str(path)!r}", ignore_prefixes=prefixes)


def load_checkpoint(
    model: nn.Module,
    path: str | Path,
    prefix: str | None = None,
    *,
    argument: str = "weights",
) -> str:
    """Load a whole-model checkpoint into ``model``; returns the key prefix that was stripped.

    ``prefix`` selects the checkpoint entries belonging to the model (e.g. ``"model."`` for a
    Lightning checkpoint whose module keeps the task model at ``self.model``); entries without
    it are ignored and it is removed from the rest. ``prefix=""`` means the keys are used as
    they are. With ``prefix=None`` it is inferred: the one prefix under which the checkpoint
    holds every parameter and buffer of ``model``. If several do (a distillation checkpoint
    with a teacher and a student of the same architecture), ValueError asks for it.

    A model with an inner ``model`` attribute (``SegmentationTask``) also accepts a checkpoint
    of the inner network alone (a torchvision segmenter's state dict).
    """
    if prefix is not None and not isinstance(prefix, str):
        raise UserTypeError(f"weights_prefix must be a str or None, got {type(prefix).__name__}")
    state = read_state_dict(path, argument=argument, prefix=prefix or "")
    where = f"{argument} {str(path)!r}"
    if prefix is not None:
        picked = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if not picked:
            raise UserValueError(f"{where}: no key starts with weights_prefix {prefix!r}")
        _strict_load(model, picked, where)
        return prefix

    targets: list[tuple[str, nn.Module]] = [("", model)]
    inner = getattr(model, "model", None)
    if isinstance(inner, nn.Module):
        targets.append(("model.", inner))
    best: tuple[int, str, nn.Module] | None = None
    for _, target in targets:
        wanted = {k for k in target.state_dict() if not k.endswith(_COUNTER)}
        scores = {p: _coverage(state, p, wanted) for p in _candidate_prefixes(state, wanted)}
        full = sorted(p for p, n in scores.items() if n == len(wanted))
        if len(full) > 1:
            raise UserValueError(
                f"{where}: holds a complete copy of the model under several prefixes {full}; "
                f"choose one with weights_prefix=..."
            )
        if full:
            picked = {k[len(full[0]) :]: v for k, v in state.items() if k.startswith(full[0])}
            _strict_load(target, picked, where)
            return full[0]
        for p, n in scores.items():
            if best is None or n > best[0]:
                best = (n, p, target)
    if best is None:
        _strict_load(model, state, where)  # nothing in common: report every key
        return ""
    _, p, target = best
    _strict_load(target, {k[len(p) :]: v for k, v in state.items() if k.startswith(p)}, where)
    return p


def _candidate_prefixes(state: Mapping[str, Tensor], wanted: set[str]) -> set[str]:
    """Every prefix ``p`` such that ``p + key`` is in ``state`` for some wanted ``key``."""
    found: set[str] = set()
    for k in state:
        parts = k.split(".")
        for i in range(len(parts)):
            if ".".join(parts[i:]) in wanted:
                found.add(".".join(parts[:i]) + "." if i else "")
    return found


def _coverage(state: Mapping[str, Tensor], prefix: str, wanted: set[str]) -> int:
    return sum(1 for k in state if k.startswith(prefix) and k[len(prefix) :] in wanted)


def key_mismatch(
    expected: Mapping[str, Tensor], state: Mapping[str, Tensor]
) -> tuple[list[str], list[str], list[str]]:
    """How ``state`` differs from a module's ``expected`` state dict: the keys it lacks, the
    keys it has in excess (BatchNorm's ``num_batches_tracked`` counts as neither) and the
    keys of both whose tensors differ in shape, each in its dict's order."""
    missing = [k for k in expected if k not in state and not k.endswith(_COUNTER)]
    unexpected = [k for k in state if k not in expected and not k.endswith(_COUNTER)]
    reshaped = [k for k, v in expected.items() if k in state and state[k].shape != v.shape]
    return missing, unexpected, reshaped


def _strict_load(
    module: nn.Module,
    state: Mapping[str, Tensor],
    where: str,
    ignore_prefixes: tuple[str, ...] = (),
) -> None:
    expected = {k: v for k, v in module.state_dict().items() if not k.startswith(ignore_prefixes)}
    missing, unexpected, reshaped = key_mismatch(expected, state)
    shapes = [
        f"{k}: file {list(state[k].shape)} vs model {list(expected[k].shape)}" for k in reshaped
    ]
    if missing or unexpected or shapes:
        lines = [f"{where} does not match the model ({type(module).__name__}):"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {_show(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {_show(unexpected)}")
        if shapes:
            lines.append(f"  shape mismatches ({len(shapes)}): {_show(shapes)}")
        raise UserValueError("\n".join(lines))
    # strict=False only because num_batches_tracked may legitimately differ (see module doc)
    module.load_state_dict(dict(state), strict=False)


def _show(items: Iterable[str]) -> str:
    items = list(items)
    head = ", ".join(items[:_SHOWN])
    return head + (f", ... (+{len(items) - _SHOWN} more)" if len(items) > _SHOWN else "")
