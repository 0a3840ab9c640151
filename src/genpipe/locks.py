"""File locks for what must not run twice at once in one checkout: a stage (non-blocking,
refused with the holder's pid) and the creation of a tracking store (blocking).

Locks are `flock`s on an open file, so the kernel drops them when the holder dies, SIGKILL
included: a lock file left by a dead process is simply taken over.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path


class Busy(RuntimeError):
    """Another live process holds the lock."""

    transient = False  # a retry would only race the holder


@contextlib.contextmanager
def exclusive(path: Path, what: str) -> Iterator[None]:
    """Hold `path` for the body, or raise Busy naming the live holder's pid at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise Busy(
                f"{what} is already running in this checkout (pid {holder}, lock {path}); "
                "wait for it to finish or stop that process"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock


@contextlib.contextmanager
def waiting(path: Path) -> Iterator[None]:
    """Hold `path` for the body, waiting for any other holder (short critical sections)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
