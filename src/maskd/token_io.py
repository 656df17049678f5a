"""Reading and writing receptive tokens: the project's own file and the released checkpoints."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from maskd.atomic import atomic_torch_save
from maskd.errors import UserTypeError, UserValueError
from maskd.tokens import ReceptiveTokens
from maskd.torch_files import UnsafeFileError, load_file

__all__ = ["load_official_tokens", "load_tokens", "save_tokens"]

FORMAT = "maskd.tokens"
VERSION = 1

TokenDict = dict[str, list[ReceptiveTokens]]

_OFFICIAL_KEY = re.compile(
    r"^(?P<prefix>(?:.*\.)?)mask_modules\.(?P<level>\d+)\."
    r"(?P<param>mask_token|prob\.[02]\.(?:weight|bias))$"
)


def _check_token_dict(tokens: object) -> Mapping[str, Sequence[ReceptiveTokens]]:
    if not isinstance(tokens, Mapping):
        raise UserTypeError(
            "tokens must be a dict {layer path: [ReceptiveTokens per level]}, "
            f"got {type(tokens).__name__}"
        )
    for layer, levels in tokens.items():
        if isinstance(levels, ReceptiveTokens):
            levels = [levels]
        if not isinstance(levels, Sequence) or not levels:
            raise UserTypeError(f"tokens[{layer!r}] must be a non-empty list of ReceptiveTokens")
        for i, tok in enumerate(levels):
            if not isinstance(tok, ReceptiveTokens):
                raise UserTypeError(
                    f"tokens[{layer!r}][{i}] must be ReceptiveTokens, got {type(tok).__name__}"
                )
    return tokens  # type: ignore[return-value]


def save_tokens(
    path: str | os.PathLike[str], tokens: Mapping[str, Sequence[ReceptiveTokens]]
) -> Path:
    """Write learned tokens to a small standalone file (atomically).

    Args:
        path: destination file (parent folders are created).
        tokens: ``{layer path: [ReceptiveTokens per level, in output order]}``.
    """
    tokens = _check_token_dict(tokens)
    layers: dict[str, list[dict[str, Any]]] = {}
    for layer, levels in tokens.items():
        if isinstance(levels, ReceptiveTokens):
            levels = [levels]
        layers[str(layer)] = [
            {
                "channels": tok.channels,
                "num_tokens": tok.num_tokens,
                "weighted": tok.weighted,
                "state_dict": {k: v.detach().cpu().clone() for k, v in tok.state_dict().items()},
            }
            for tok in levels
        ]
    return atomic_torch_save({"format": FORMAT, "version": VERSION, "layers": layers}, path)


def _safe_load(path: Path, trusted: bool = False) -> Any:
    if not trusted:  # tensors and plain containers only, one clear error for a bad file
        return load_file(path, argument="tokens")
    if not path.is_file():
        raise FileNotFoundError(f"tokens: no such file {str(path)!r}")
    return torch.load(path, map_location="cpu", weights_only=False)


def load_tokens(path: str | os.PathLike[str]) -> TokenDict:
    """Read a file written by :func:`save_tokens`.

    Returns:
        ``{layer path: [ReceptiveTokens per level]}`` on the CPU.
    """
    path = Path(path)
    obj = _safe_load(path)
    if not isinstance(obj, Mapping) or obj.get("format") != FORMAT:
        found = sorted(obj)[:10] if isinstance(obj, Mapping) else type(obj).__name__
        raise UserValueError(
            f"{path} is not a maskd token file (found {found}); "
            "for released MasKD checkpoints use load_official_tokens()"
        )
    if obj.get("version") != VERSION:
        raise UserValueError(
            f"{path}: token file version {obj.get('version')!r} is not supported (expected {VERSION})"
        )
    out: TokenDict = {}
    for layer, levels in obj["layers"].items():
        out[layer] = []
        for i, entry in enumerate(levels):
            tok = ReceptiveTokens(entry["channels"], entry["num_tokens"], entry["weighted"])
            try:
                tok.load_state_dict(entry["state_dict"])
            except RuntimeError as err:
                raise UserValueError(
                    f"{path}: level {i} of layer {layer!r} does not match its header: {err}"
                ) from err
            out[layer].append(tok)
    return out


def _tokens_from_params(params: Mapping[str, Tensor], where: str) -> ReceptiveTokens:
    token = params.get("mask_token")
    if token is None or token.dim() != 2:
        shape = None if token is None else tuple(token.shape)
        raise UserValueError(f"{where}: expected 'mask_token' of shape [T, C], found {shape}")
    t, c = token.shape
    weighted = any(k.startswith("prob.") for k in params)
    expected = {"mask_token": (t, c)}
    if weighted:
        expected |= {
            "prob.0.weight": (c, c, 3, 3),
            "prob.0.bias": (c,),
            "prob.2.weight": (t, c, 1, 1),
            "prob.2.bias": (t,),
        }
    got = {k: tuple(v.shape) for k, v in params.items()}
    if got != expected:
        raise UserValueError(
            f"{where}: tensors {got} do not form receptive tokens with T={t}, C={c}; expected {expected}"
        )
    tok = ReceptiveTokens(int(c), int(t), weighted)
    tok.load_state_dict({k: v.float() for k, v in params.items()})
    return tok


def load_official_tokens(
    path_or_state_dict: str | os.PathLike[str] | Mapping[str, Any],
    prefix: str | None = None,
    trusted: bool = False,
) -> list[ReceptiveTokens]:
    """Load tokens from the authors' released checkpoints, inferring T, C and weighting.

    Two formats are read:

    - detection: ``{"state_dict": {...mask_modules.{level}.mask_token: [T, C],
      ...mask_modules.{level}.prob.{0,2}.{weight,bias}}}`` → one entry per level, in level order;
    - segmentation: a bare ``{"mask_token": [T, C]}`` → a one-element list.

    Args:
        path_or_state_dict: a checkpoint file or an already loaded dict.
        prefix: the part of the keys before ``mask_modules.`` when a checkpoint holds
            several token sets.
        trusted: allow unpickling arbitrary objects (only for files you trust).
    """
    if isinstance(path_or_state_dict, Mapping):
        obj: Any = path_or_state_dict
        src = "state dict"
    else:
        path = Path(path_or_state_dict)
        try:
            obj = _safe_load(path, trusted)
        except UnsafeFileError as err:
            raise UnsafeFileError(f"{err}; if you trust its source, pass trusted=True") from err
        src = str(path)
    if not isinstance(obj, Mapping):
        raise UserValueError(f"{src}: expected a dict of tensors, found {type(obj).__name__}")
    sd = obj.get("state_dict", obj)
    if not isinstance(sd, Mapping):
        raise UserValueError(
            f"{src}: 'state_dict' is a {type(sd).__name__}, expected a dict of tensors"
        )

    if "mask_token" in sd:
        params = {k: v for k, v in sd.items() if k == "mask_token" or k.startswith("prob.")}
        return [_tokens_from_params(params, src)]

    groups: dict[str, dict[int, dict[str, Tensor]]] = {}
    for key, value in sd.items():
        match = _OFFICIAL_KEY.match(str(key))
        if match and isinstance(value, Tensor):
            levels = groups.setdefault(match["prefix"], {})
            levels.setdefault(int(match["level"]), {})[match["param"]] = value
    if not groups:
        sample = list(sd)[:8]
        raise UserValueError(
            f"{src}: no MasKD tokens found; expected 'mask_token' or "
            f"'...mask_modules.<level>.mask_token' keys, found keys like {sample}"
        )
    if prefix is not None:
        if prefix not in groups:
            raise UserValueError(
                f"{src}: prefix {prefix!r} not found; token prefixes are {sorted(groups)}"
            )
        chosen = groups[prefix]
    elif len(groups) > 1:
        raise UserValueError(
            f"{src} holds several token sets with prefixes {sorted(groups)}; pass prefix="
        )
    else:
        chosen = next(iter(groups.values()))
    order = sorted(chosen)
    if order != list(range(len(order))):
        raise UserValueError(f"{src}: token levels {order} are not contiguous from 0")
    return [_tokens_from_params(chosen[i], f"{src} level {i}") for i in order]
