"""Reading torch files safely: tensors and plain containers only, one clear error per bad file."""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch

from maskd.errors import UserValueError

__all__ = ["UnsafeFileError", "load_file", "refusal"]

# torch's weights-only unpickler names the refused class or function like this
_UNSAFE = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


class UnsafeFileError(UserValueError):
    """A torch file that holds pickled Python objects, refused without loading them."""


def load_file(path: str | Path, *, argument: str = "weights", mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` with one clear error for every bad file.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is empty, truncated or not a torch file, or it holds pickled
            Python objects other than tensors and plain containers (never loaded, for safety).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{argument}: no such file {str(path)!r}")
    if path.stat().st_size == 0:
        raise UserValueError(f"{argument}: {str(path)!r} is empty (0 bytes)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        raise refusal(err, argument, path) from err
    except Exception as err:  # torch raises several types for a corrupt or foreign file
        first = str(err).splitlines()[0] if str(err) else "no details"
        raise UserValueError(
            f"{argument}: cannot read {str(path)!r} as a torch checkpoint (truncated or not "
            f"a checkpoint; {type(err).__name__}: {first})"
        ) from err


def refusal(err: pickle.UnpicklingError, argument: str, path: str | Path) -> UserValueError:
    """The one-line error for a file torch's weights-only unpickler refused.

    An :class:`UnsafeFileError` naming the refused class or function when the file holds
    pickled Python objects; otherwise (not a pickle torch can read) a plain "cannot read".
    """
    found = _UNSAFE.search(str(err))
    if found is None:  # e.g. "Unsupported operand": corrupt, or not a torch file at all
        return UserValueError(
            f"{argument}: cannot read {str(path)!r} as a torch checkpoint (truncated, "
            f"corrupt or not a checkpoint)"
        )
    return UnsafeFileError(
        f"{argument}: {str(path)!r} holds Python objects other than tensors and plain "
        f"containers ({found.group(1)}), which are not loaded for safety; keep only "
        f"tensors in it (e.g. a state_dict())"
    )
