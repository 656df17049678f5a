"""One process per run folder: an exclusive lock on ``run.out`` while a job trains in it.

Two ``maskd`` jobs writing one folder (the same command started twice, or a scheduler
re-queueing a job that is still running) overwrite each other's checkpoints and outputs.
The first process holds an advisory ``flock`` on the folder itself (no file is added to
it); a second one is refused with one line before it reads or writes anything there.
Only the launching process locks: DDP workers (``RANK`` / ``LOCAL_RANK`` / ``NODE_RANK``
other than 0) share the job of the one that did. Where ``fcntl`` is missing (Windows) the
lock is skipped.
"""

from __future__ import annotations

import os
from pathlib import Path

from maskd.errors import UserRuntimeError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["RunFolderInUse", "RunLock"]


class RunFolderInUse(UserRuntimeError):
    """Another process is running a job in this run folder.

    The command exits with ``exit_code`` 75 (``EX_TEMPFAIL`` of sysexits.h: try again
    later), not 1, so a scheduler or script can tell "busy" from a failed run."""

    exit_code = 75


def _launching_process() -> bool:
    return all(os.environ.get(k, "0") == "0" for k in ("RANK", "LOCAL_RANK", "NODE_RANK"))


class RunLock:
    """``acquire()`` once the folder exists (a no-op before, and when already held);
    ``release()`` at the end of the job (also usable as a context manager)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self._fd: int | None = None

    def acquire(self) -> None:
        if self._fd is not None or fcntl is None or not _launching_process():
            return
        if not self.folder.is_dir():
            return
        fd = os.open(self.folder, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunFolderInUse(
                f"run.out: {str(self.folder)!r} is in use by another maskd process; let it "
                "finish (or stop it) before starting or resuming a run there, or choose "
                "another --run.out"
            ) from None
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
