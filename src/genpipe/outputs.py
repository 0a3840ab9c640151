"""All-or-nothing stage outputs: write into temporary siblings, rename into place at the end.

A stage that fails, or is interrupted, leaves its previous outputs untouched and no
half-written files behind. Each run's temporaries carry its pid, so two runs never write
into one another's; those of dead runs (SIGKILL) are swept by the next run.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _tmp(path: Path, pid: int) -> Path:
    return path.with_name(f".{path.name}.tmp-{pid}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _sweep(path: Path) -> None:
    """Remove temporaries of `path` left by runs whose process is gone."""
    if not path.parent.is_dir():
        return
    for t in path.parent.glob(f".{path.name}.tmp*"):
        pid = t.name.rsplit("-", 1)[-1]
        if not (pid.isdigit() and _alive(int(pid))):
            _remove(t)


@contextlib.contextmanager
def staged(*paths: Path) -> Iterator[list[Path]]:
    """Yield temporary paths to write instead of `paths`; on success they replace them."""
    tmps = [_tmp(p, os.getpid()) for p in paths]
    for p, t in zip(paths, tmps):
        _sweep(p)
        _remove(t)
        t.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield tmps
    except BaseException:
        for t in tmps:
            _remove(t)
        raise
    for p, t in zip(paths, tmps):
        if not t.exists():
            raise RuntimeError(f"stage did not write {p}")
        _remove(p)
        t.replace(p)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def write_json(path: Path, obj: Any) -> None:
    """Deterministic JSON: sorted keys, fixed float formatting from Python's repr."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, sort_keys=True, indent=2) + "\n")
