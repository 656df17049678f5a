"""Config files that build on others: a top-level ``base:`` key.

A config file may name one or more base files (``base: ../_base/schedule_2x.yaml`` or a
list), each a path relative to the file that names it. The result is built depth-first: every
base, itself resolved the same way, is merged in the order listed, then the file's own keys on
top. Merging is per key: two mappings merge key by key (recursively), anything else — a list,
a scalar, ``null`` — replaces what the bases set. ``base`` itself never reaches the options.

:func:`load_config` is what ``maskd <command> --config FILE`` reads (through
:class:`ConfigFileAction`), so ``--print_config``, the saved ``config.yaml`` and every caller
of this function see the same merged options.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import ActionConfigFile
from jsonargparse.typing import Path_fr

from maskd.errors import UserValueError

__all__ = ["BASE_KEY", "ConfigFileAction", "load_config", "merge_configs", "resolve_bases"]

BASE_KEY = "base"


class _Loader(yaml.SafeLoader):
    """YAML as jsonargparse reads a config file: ``1e-5`` is a float, dates stay strings."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(  # YAML 1.1 wants a dot and a signed exponent
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # a SafeLoader: plain data only


def merge_configs(below: Mapping[str, Any], above: Mapping[str, Any]) -> dict[str, Any]:
    """``above`` over ``below``: mappings merge key by key, any other value replaces.

    Neither argument is modified; the result shares no mapping with them.
    """
    out: dict[str, Any] = {k: _copy(v) for k, v in below.items()}
    for key, value in above.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge_configs(out[key], value)
        else:
            out[key] = _copy(value)
    return out


def _copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def _chain(files: Sequence[Path]) -> str:
    return " -> ".join(str(f) for f in files)


def _read(path: Path, chain: Sequence[Path]) -> dict[str, Any]:
    """One file's own keys (a mapping; an empty file is ``{}``)."""
    try:
        text = path.read_text()
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise UserValueError(
            f"config {_chain([*chain, path])}: cannot read it ({reason})"
        ) from None
    try:
        data = _load_yaml(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise UserValueError(f"config {_chain([*chain, path])}: not valid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserValueError(
            f"config {_chain([*chain, path])}: expected a mapping of options, "
            f"got {type(data).__name__}"
        )
    return data


def _base_paths(data: Mapping[str, Any], where: Path, chain: Sequence[Path]) -> list[Path]:
    value = data.get(BASE_KEY)
    if value is None:
        return []
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise UserValueError(
            f"config {_chain(chain)}: '{BASE_KEY}' must be a file path or a list of paths, "
            f"got {value!r}"
        )
    # normpath, not resolve: messages keep the user's spelling, minus "dir/../"
    return [Path(os.path.normpath(where / os.path.expanduser(n))) for n in names]


def resolve_bases(
    data: Mapping[str, Any], where: str | Path, chain: Sequence[Path] = ()
) -> dict[str, Any]:
    """``data`` (one file's keys) merged over the bases it names, ``base`` removed.

    Args:
        data: the file's own keys, possibly with ``base``.
        where: folder its relative base paths start from (the file's folder).
        chain: the files that led here, outermost first (for cycles and error messages).
    """
    merged: dict[str, Any] = {}
    for path in _base_paths(data, Path(where), chain):
        if not path.is_file():
            problem = "is not a file" if path.exists() else "not found"
            raise UserValueError(f"config {_chain(chain)}: base {str(path)!r} {problem}")
        key = path.resolve()
        if key in {p.resolve() for p in chain}:
            raise UserValueError(f"config base cycle: {_chain([*chain, path])}")
        base = resolve_bases(_read(path, chain), path.parent, [*chain, path])
        merged = merge_configs(merged, base)
    own = {k: v for k, v in data.items() if k != BASE_KEY}
    return merge_configs(merged, own)


def load_config(path: str | Path) -> dict[str, Any]:
    """The options of a config file with every ``base`` resolved (see the module docstring)."""
    path = Path(path)
    return resolve_bases(_read(path, []), path.parent, [path])


class ConfigFileAction(ActionConfigFile):
    """``--config``: a YAML file (or YAML text) whose ``base`` files are merged in first.

    The merged options enter jsonargparse as one document, so later ``--config`` files and
    command-line options override them as usual and ``--print_config`` shows the result.
    """

    def __call__(self, parser: Any, cfg: Any, values: Any, option_string: Any = None) -> None:
        source = None
        if isinstance(values, str | os.PathLike) and Path(values).is_file():
            merged = load_config(values)
            source = Path_fr(values)
        else:  # YAML text given inline: its bases are relative to the working directory
            try:
                data = _load_yaml(values) if isinstance(values, str) else None
            except yaml.YAMLError:
                data = None
            if not (isinstance(data, dict) and BASE_KEY in data):
                super().__call__(parser, cfg, values, option_string)  # jsonargparse's errors
                return
            merged = resolve_bases(data, Path.cwd(), [Path("<--config text>")])
        self.apply_config(parser, cfg, self.dest, yaml.safe_dump(merged, sort_keys=False))
        cfg[self.dest][-1] = source  # the file, as jsonargparse records it (None for text)
