"""Initialising named parts of a model from a checkpoint (a prefix mapping).

The authors' RetinaNet student starts its FPN and head from the trained teacher's checkpoint
(mmrazor ``init_cfg=dict(type='Pretrained', prefix='neck' | 'bbox_head', checkpoint=...)``
in ``configs/distill/maskd/retinanet_r101-retinanet_r50_coco.py``), its backbone from
ImageNet. :func:`init_from_checkpoint` does the same for any model: ``prefixes`` maps a key
prefix of the checkpoint to a module path of the model, e.g.
``{"backbone.fpn": "backbone.fpn", "head": "head"}`` for torchvision's RetinaNet.

Each mapped part is loaded strictly: every parameter and buffer of the model's module must be
in the checkpoint under the source prefix with the same shape, and every checkpoint tensor
under that prefix must belong to the module (``num_batches_tracked`` counters excepted, as in
:mod:`maskd.models.weights`). Nothing is copied unless every part matches. The file is read
with ``torch.load(weights_only=True)`` (no pickled code).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from maskd.errors import UserTypeError, UserValueError
from maskd.models.weights import key_mismatch, read_state_dict

__all__ = ["init_from_checkpoint"]

_COUNTER = "num_batches_tracked"


def init_from_checkpoint(
    model: nn.Module,
    path: str | Path,
    prefixes: Mapping[str, str],
    *,
    file_prefix: str = "",
    argument: str = "init_from",
) -> dict[str, int]:
    """Copy the checkpoint's tensors under each source prefix into the mapped module of ``model``.

    Args:
        model: the model to initialise in place.
        path: a state dict on disk (layouts as :func:`~maskd.models.weights.read_state_dict`).
        prefixes: ``{checkpoint prefix: model module path}``; dotted names without a trailing
            dot, ``""`` for the whole checkpoint / model. Keys ``<src>.<rest>`` are loaded as
            ``<dst>.<rest>``. Model paths must not overlap (one inside another).
        file_prefix: stripped from the checkpoint keys first (the model's prefix inside a
            Lightning checkpoint, e.g. ``"net."``); keys without it are ignored.
        argument: the option's name in error messages.

    Returns:
        ``{model module path: number of tensors copied}`` in the order of ``prefixes``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a source prefix that matches no checkpoint key, a model path that names no
            module, overlapping model paths, or a part whose keys or shapes differ.
    """
    pairs = _check_prefixes(prefixes, argument)
    modules = dict(model.named_modules())
    for src, dst in pairs:
        if dst not in modules:
            close = difflib.get_close_matches(dst, [n for n in modules if n], n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            raise UserValueError(
                f"{argument}.prefixes: {src!r} -> {dst!r}: the model "
                f"({type(model).__name__}) has no module {dst!r}{hint}"
            )
    state = read_state_dict(path, argument=f"{argument}.path")
    if file_prefix:
        state = {k[len(file_prefix) :]: v for k, v in state.items() if k.startswith(file_prefix)}
    where = f"{argument}: {str(path)!r}"
    parts = [(dst, _part(state, src, dst, modules[dst], where)) for src, dst in pairs]
    counts: dict[str, int] = {}
    with torch.no_grad():
        for dst, part in parts:
            modules[dst].load_state_dict(part, strict=False)  # checked in _part; counters aside
            counts[dst] = sum(1 for k in part if not k.endswith(_COUNTER))
    return counts


def _check_prefixes(prefixes: Mapping[str, str], argument: str) -> list[tuple[str, str]]:
    """``prefixes`` as ``(src, dst)`` pairs, trailing dots dropped; one-line errors otherwise."""
    if not isinstance(prefixes, Mapping) or not prefixes:
        raise UserTypeError(
            f"{argument}.prefixes must be a non-empty mapping {{checkpoint prefix: model "
            f"module}}, got {prefixes!r}"
        )
    pairs = []
    for src, dst in prefixes.items():
        if not isinstance(src, str) or not isinstance(dst, str):
            raise UserTypeError(
                f"{argument}.prefixes: {src!r}: {dst!r}: both must be strings (dotted names)"
            )
        pairs.append((src.rstrip("."), dst.rstrip(".")))
    targets = [dst for _, dst in pairs]
    for i, a in enumerate(targets):
        for b in targets[i + 1 :]:
            if _inside(a, b) or _inside(b, a):
                raise UserValueError(
                    f"{argument}.prefixes: the model paths {a!r} and {b!r} overlap; each "
                    "tensor may be initialised once"
                )
    return pairs


def _inside(inner: str, outer: str) -> bool:
    """Whether module path ``inner`` is ``outer`` or lies under it (``""`` is the root)."""
    return outer == "" or inner == outer or inner.startswith(outer + ".")


def _part(
    state: Mapping[str, Tensor], src: str, dst: str, module: nn.Module, where: str
) -> dict[str, Tensor]:
    """The checkpoint tensors under ``src``, keyed as in ``module.state_dict()``, checked."""
    head = f"{src}." if src else ""
    part = {k[len(head) :]: v for k, v in state.items() if k.startswith(head)}
    if not part:
        raise UserValueError(
            f"{where}: no key starts with the prefix {src!r} (for {dst!r}); the file's "
            f"top-level names: {_top_level(state)}"
        )
    expected = module.state_dict()
    label = f"{where}: prefix {src!r} -> {dst!r}"
    missing, unexpected, reshaped = key_mismatch(expected, part)
    shapes = [
        f"{_join(src, k)} {list(part[k].shape)} vs model {_join(dst, k)} {list(expected[k].shape)}"
        for k in reshaped
    ]
    if shapes:
        raise UserValueError(f"{label}: shape mismatch: {_few(shapes)}")
    if missing:
        raise UserValueError(
            f"{label}: the file has no tensor for the model's {_few([_join(dst, k) for k in missing])}"
        )
    if unexpected:
        raise UserValueError(
            f"{label}: the model's module has no place for the file's "
            f"{_few([_join(src, k) for k in unexpected])}"
        )
    return {k: v for k, v in part.items() if k in expected}


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _top_level(state: Mapping[str, Tensor]) -> str:
    names = sorted({k.split(".", 1)[0] for k in state})
    return ", ".join(names[:12]) + (f", ... (+{len(names) - 12} more)" if len(names) > 12 else "")


def _few(items: list[str], shown: int = 3) -> str:
    more = f" (+{len(items) - shown} more)" if len(items) > shown else ""
    return ", ".join(repr(i) for i in items[:shown]) + more
