"""Lineage facts a run records about itself: code commit, data digests, environment.

Digests use DVC's own md5 scheme (file: md5 of bytes; folder: md5 of the sorted JSON list
of its files' md5s, suffixed `.dir`), so they compare directly with dvc.lock.

Lineage lives beside the outputs, never in them: a file naming the run inside an output
would change its hash on every run, re-run everything downstream and let DVC's run cache
restore outputs naming runs that may not exist. A run tags itself with its outputs' md5s
(MLflow finds the producer of any bytes by them) and leaves a sidecar under
.genpipe/lineage/ (untracked) as a shortcut, trusted only while its md5 still matches.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

SIDECARS = Path(".genpipe/lineage")
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


def dir_entries(path: Path) -> list[dict[str, str]]:
    """Every file under `path` as {md5, relpath}, sorted by relpath (DVC's order)."""
    entries = [
        {"md5": file_md5(p), "relpath": p.relative_to(path).as_posix()}
        for p in path.rglob("*")
        if p.is_file()
    ]
    return sorted(entries, key=lambda e: e["relpath"])


def dvc_md5(path: Path) -> str:
    """The md5 DVC records for `path` in dvc.lock."""
    if path.is_file():
        return file_md5(path)
    blob = json.dumps(dir_entries(path), sort_keys=True).encode()
    return hashlib.md5(blob).hexdigest() + ".dir"


def dir_difference(path: Path, expected: str, cache: Path) -> str:
    """What differs between folder `path` and the version DVC recorded as `expected` (an
    md5 `.dir`): files added, removed and changed by name when the cache holds that
    version's manifest, else the two digests."""
    actual = dvc_md5(path) if path.is_dir() else "missing"
    manifest = cache / "files" / "md5" / expected[:2] / expected[2:]
    try:
        recorded = {e["relpath"]: e["md5"] for e in json.loads(manifest.read_text())}
    except (OSError, ValueError, KeyError, TypeError):
        return f"{path} has md5 {actual}, recorded {expected}"
    now = {e["relpath"]: e["md5"] for e in dir_entries(path)} if path.is_dir() else {}
    parts = [
        (label, names)
        for label, names in (
            ("added", sorted(now.keys() - recorded.keys())),
            ("removed", sorted(recorded.keys() - now.keys())),
            ("changed", sorted(k for k in now.keys() & recorded.keys() if now[k] != recorded[k])),
        )
        if names
    ]
    listed = "; ".join(
        f"{label}: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"
        for label, names in parts
    )
    return f"{path} has md5 {actual}, recorded {expected} ({listed or 'same files'})"


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


def sidecar(root: Path, out: Path) -> Path:
    """Where the lineage of output `out` (relative to `root`) is kept."""
    return root / SIDECARS / f"{out.as_posix()}.json"


def write_sidecar(root: Path, out: Path, record: dict[str, Any]) -> None:
    path = sidecar(root, out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, sort_keys=True, indent=2) + "\n")
    tmp.replace(path)


def read_sidecar(root: Path, out: Path) -> dict[str, Any]:
    """The sidecar's record, or {} when it is missing or unreadable (e.g. after DVC restored
    the output from its run cache, or in a fresh clone)."""
    try:
        record = json.loads(sidecar(root, out).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def output_digests(root: Path, outs: list[Path]) -> dict[str, str]:
    """{relative file path: md5} of every output file: what a stage run logs, and what an
    audit re-run must reproduce byte for byte."""
    digests: dict[str, str] = {}
    for out in outs:
        path = root / out
        if path.is_file():
            digests[out.as_posix()] = file_md5(path)
        elif path.is_dir():
            for e in dir_entries(path):
                digests[f"{out.as_posix()}/{e['relpath']}"] = e["md5"]
    return digests
