"""Lineage facts a run records about itself: code commit, data digests, environment.

Digests use DVC's own md5 scheme (file: md5 of bytes; folder: md5 of the sorted JSON list
of its files' md5s, suffixed `.dir`), so they compare directly with dvc.lock.
"""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

META_FILE = "meta.json"
# Files the pipeline itself rewrites; changes there are results, not code edits (DVC also
# appends its outputs to .gitignore files).
PIPELINE_WRITES = ("dvc.lock", "metrics/", "plots/", "reports/")
TRACKED_PACKAGES = ("torch", "torchvision", "numpy", "scikit-learn", "mlflow", "dvc", "prefect")


def file_md5(path: Path) -> str:
    h = hashlib.md5()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def dir_entries(path: Path, exclude: tuple[str, ...] = ()) -> list[dict[str, str]]:
    """Every file under `path` as {md5, relpath}, sorted by relpath (DVC's order)."""
    entries = [
        {"md5": file_md5(p), "relpath": p.relative_to(path).as_posix()}
        for p in path.rglob("*")
        if p.is_file() and p.name not in exclude
    ]
    return sorted(entries, key=lambda e: e["relpath"])


def dvc_md5(path: Path) -> str:
    """The md5 DVC records for `path` in dvc.lock."""
    if path.is_file():
        return file_md5(path)
    blob = json.dumps(dir_entries(path), sort_keys=True).encode()
    return hashlib.md5(blob).hexdigest() + ".dir"


def git_info(root: Path) -> dict[str, Any]:
    """Commit and dirty flag; outputs of the pipeline itself don't count as dirt."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        status = git("status", "--porcelain", "--untracked-files=no")
    except (subprocess.CalledProcessError, FileNotFoundError):
        return {"commit": "unknown", "dirty": True}
    dirty_files = [
        path
        for line in status.splitlines()
        if not (path := line[3:]).startswith(PIPELINE_WRITES) and not path.endswith(".gitignore")
    ]
    return {"commit": commit, "dirty": bool(dirty_files)}


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def read_meta(folder: Path) -> dict[str, Any]:
    path = folder / META_FILE
    if not path.is_file():
        return {}
    return json.loads(path.read_text())


def output_digests(root: Path, outs: list[Path]) -> dict[str, str]:
    """{relative file path: md5} of every output file except meta.json (it names the run):
    what a stage run logs, and what an audit re-run must reproduce byte for byte."""
    digests: dict[str, str] = {}
    for out in outs:
        path = root / out
        if path.is_file():
            digests[out.as_posix()] = file_md5(path)
        elif path.is_dir():
            for e in dir_entries(path, exclude=(META_FILE,)):
                digests[f"{out.as_posix()}/{e['relpath']}"] = e["md5"]
    return digests
