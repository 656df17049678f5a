"""Reading images, label PNGs and annotation JSON with errors that name the file.

Every loader in `maskd.data` reads through these helpers, so a missing file raises
`FileNotFoundError` and an undecodable one raises `ValueError`, both with the path.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from maskd.errors import UserValueError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class BadSampleError(UserValueError):
    """A sample whose file exists but cannot be decoded or is inconsistent."""


def require_dir(path: Path, what: str) -> Path:
    """Return `path` if it is a directory; else raise FileNotFoundError naming it."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{what} directory not found: {path}")
    return path


def require_file(path: Path, what: str) -> Path:
    """Return `path` if it is a file; else raise FileNotFoundError naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def _open(path: Path, what: str) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        img = Image.open(path)
        img.load()  # decode now so truncated files fail here, with the path
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise BadSampleError(f"cannot decode {what} {path}: {err}") from err
    return img


def read_rgb(path: Path) -> np.ndarray:
    """Decode an image file to RGB. Returns uint8 [H, W, 3]."""
    img = _open(path, "image")
    try:
        return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()
    except (OSError, ValueError) as err:
        raise BadSampleError(f"cannot convert image {path} to RGB: {err}") from err


def read_label_png(path: Path) -> np.ndarray:
    """Decode a single-channel label image (mode L, P or I;16) of class indices.

    Palette PNGs give their indices, not their colours. Returns uint8 [H, W].
    """
    img = _open(path, "label image")
    if img.mode not in ("L", "P", "I;16", "I"):
        raise BadSampleError(
            f"label image {path} has mode {img.mode!r}; expected a single-channel PNG of class "
            "indices (mode L or a palette PNG), not a colour image"
        )
    arr = np.asarray(img)
    if arr.ndim != 2:
        raise BadSampleError(f"label image {path} has shape {arr.shape}; expected [H, W]")
    if arr.dtype != np.uint8:
        if arr.max(initial=0) > 255 or arr.min(initial=0) < 0:
            raise BadSampleError(f"label image {path} holds values outside 0..255")
        arr = arr.astype(np.uint8)
    return arr.copy()


def read_json(path: Path, what: str = "annotation file") -> Any:
    """Parse a JSON file; FileNotFoundError / ValueError name the path."""
    path = require_file(path, what)
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserValueError(f"{what} {path} is not valid JSON: {err}") from err
