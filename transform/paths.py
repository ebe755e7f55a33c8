"""File-system helpers shared by the stages that own an output folder.

A stage that writes a folder holds its lock (`locked`) while it works, so two processes never
write the same output at once, and what an interrupted run left behind can be removed safely by
the next one (`remove_leftovers`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from transform.errors import WidedeepError


def remove_paths(paths: Iterable[Path]) -> None:
    """Removes each path, folder or file; a path that does not exist is skipped."""
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


class InUseError(WidedeepError, RuntimeError):
    """Another process holds the lock of a folder this one wants to write; names its PID."""


@contextlib.contextmanager
def locked(
    lock_file: Path,
    what: str,
    *,
    wait: bool = False,
    echo: Callable[[str], None] | None = None,
) -> Iterator[None]:
    """Holds an advisory lock on `lock_file` (created if needed) for the block.

    The lock is `fcntl.flock` on the file, so it is released when its holder ends, however it
    ends (a kill -9 included): whoever holds it may treat leftovers of earlier runs as dead.
    The holder's PID is written into the file, for the message another process gets: without
    `wait`, `InUseError` naming `what` and that PID; with `wait`, the call blocks until the
    lock is free (after saying so through `echo`). The file itself is never removed: removing
    a lock file while another process waits on it would let two processes hold "the" lock.
    """
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        taken, holder = _take_or_find_holder(fd)
        if not taken:
            by = f"PID {holder}" if holder else "another process"
            if not wait:
                raise InUseError(
                    f"{what} is in use by {by} (lock {lock_file}); wait for it to finish, or "
                    "pass --wait to wait for it"
                ) from None
            if echo is not None:
                echo(f"waiting for {by} to finish with {what} ...")
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield
        finally:
            # Emptied before it is released: a PID left in the file would name a process that
            # no longer holds the lock.
            os.ftruncate(fd, 0)
    finally:
        # Closing the descriptor releases the lock.
        os.close(fd)


def _take_or_find_holder(fd: int, attempts: int = 50) -> tuple[bool, int | None]:
    """Takes the exclusive lock on `fd` if it is free, else finds the PID of its holder.

    Returns (True, None) once taken, (False, PID) when held. The holder writes its PID just
    after it takes the lock and empties the file just before it lets go, so an empty file means
    either is under way: the lock is tried and the file read again, a couple of milliseconds
    apart, until one of them answers; (False, None) if neither does.
    """
    for _ in range(attempts):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True, None
        except BlockingIOError:
            pass
        try:
            text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        except OSError:
            return False, None
        if text.isdigit():
            return False, int(text)
        time.sleep(0.002)
    return False, None


def remove_leftovers(folder: Path, patterns: Iterable[str]) -> list[Path]:
    """Removes what interrupted runs left in `folder` (names matching `patterns`).

    Call it only while holding the folder's lock: then no live process owns those leftovers.
    Returns what was removed.
    """
    removed = []
    if not folder.is_dir():
        return removed
    for pattern in patterns:
        for path in sorted(folder.glob(pattern)):
            remove_paths([path])
            removed.append(path)
    return removed
