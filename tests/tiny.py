"""Tiny params for pipeline tests: the `tiny` preset (presets/tiny.yaml), in which every stage
runs for real, for seconds."""

from pathlib import Path

import yaml


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = (
            merge(base.get(k, {}), v)
            if isinstance(v, dict) and isinstance(base.get(k), dict)
            else v
        )
    return out


def write_tiny_params(repo: Path, extra: dict | None = None) -> None:
    """Make the repo's params.yaml the tiny preset, with `extra` merged on top."""
    tiny = yaml.safe_load((repo / "presets" / "tiny.yaml").read_text())
    (repo / "params.yaml").write_text(yaml.safe_dump(merge(tiny, extra or {}), sort_keys=False))


def edit_params(repo: Path, changes: dict) -> None:
    """Merge `changes` into the repo's params.yaml, leaving every other value as it is."""
    params = yaml.safe_load((repo / "params.yaml").read_text())
    (repo / "params.yaml").write_text(yaml.safe_dump(merge(params, changes), sort_keys=False))
