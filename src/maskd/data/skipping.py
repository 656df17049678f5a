"""Shared `skip_bad` behaviour: a bad sample either raises or is replaced by the next good one."""

from __future__ import annotations

import logging
from typing import Any

from maskd.data.files import BadSampleError
from maskd.errors import UserRuntimeError

logger = logging.getLogger("maskd.data")


class SkipBadSamples:
    """Mixin for map-style datasets with `_load(index)` and `__len__`.

    Without `skip_bad`, a sample whose file is missing or cannot be decoded raises with
    the file's path. With `skip_bad=True` it is logged once, remembered, counted in
    `skipped` (and its path in `skipped_paths`), and the next index is returned instead.
    With DataLoader workers each worker keeps its own count.
    """

    skip_bad: bool = False

    def _init_skipping(self, skip_bad: bool) -> None:
        self.skip_bad = bool(skip_bad)
        self.skipped_paths: list[str] = []
        self._bad: set[int] = set()

    @property
    def skipped(self) -> int:
        """Number of distinct samples skipped so far (at init and while reading)."""
        return len(self.skipped_paths)

    def _record_skip(self, path: str, reason: str, index: int | None = None) -> None:
        if index is not None:
            self._bad.add(index)
        self.skipped_paths.append(path)
        logger.warning("skipping bad sample %s: %s", path, reason)

    def _load(self, index: int) -> Any:
        raise NotImplementedError

    def _describe(self, index: int) -> str:
        """The file(s) behind sample `index`, for the skip log."""
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, index: int) -> Any:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} samples")
        index %= n
        for step in range(n):
            i = (index + step) % n
            if i in self._bad:
                continue
            try:
                return self._load(i)
            except (BadSampleError, FileNotFoundError) as err:
                if not self.skip_bad:
                    raise
                self._record_skip(self._describe(i), str(err), i)
        raise UserRuntimeError(f"all {n} samples of {type(self).__name__} failed to load")
