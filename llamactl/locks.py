"""One way to take a lock between llamactl processes: an flock on a side file.

The kernel drops the lock with the process, so a crashed pull, fetch or build leaves no stale
lock behind. Used for model pulls, source fetches and builds of one configuration."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path


@contextlib.contextmanager
def held(
    lock_path: Path,
    *,
    timeout: float | None = None,
    on_wait: Callable[[], None] | None = None,
    on_timeout: Callable[[], Exception] | None = None,
) -> Iterator[None]:
    """Hold the lock at `lock_path`, waiting for another holder (forever, or `timeout` s,
    then raise `on_timeout()`); `on_wait` is called once if the lock was busy."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = None if timeout is None else time.monotonic() + timeout
        told = False
        while not _try_lock(fd):
            if deadline is not None and time.monotonic() >= deadline:
                raise (on_timeout() if on_timeout else TimeoutError(f"{lock_path} is held"))
            if not told and on_wait is not None:
                on_wait()
            told = True
            time.sleep(0.1)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _try_lock(fd: int) -> bool:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)  # type: ignore[attr-defined]
            return True
        except OSError:
            return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
