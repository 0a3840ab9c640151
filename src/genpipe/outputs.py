"""All-or-nothing stage outputs: write into temporary siblings, rename into place at the end.

A stage that fails, or is interrupted, leaves its previous outputs untouched and no
half-written files behind.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


@contextlib.contextmanager
def staged(*paths: Path) -> Iterator[list[Path]]:
    """Yield temporary paths to write instead of `paths`; on success they replace them."""
    tmps = [_tmp(p) for p in paths]
    for t in tmps:
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
