"""The pipeline's stages, one module each: a declared `SPEC` (genpipe.spec.StageSpec) and
`run(params, root)`. A stage reads other stages' outputs through genpipe.artifacts and
never imports another stage; nothing below this package imports it."""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType
from typing import Any

from genpipe.config import Params
from genpipe.tracking import store

# In pipeline order (dvc.yaml is written in this order).
STAGES = (
    "prepare",
    "pretrain",
    "judges",
    "tokenizer",
    "tokenize",
    "prior",
    "finetune",
    "evaluate",
    "register",
)


def load(name: str) -> ModuleType:
    """A stage module by name (imported on demand: a stage's imports are its code deps)."""
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    return importlib.import_module(f"{__name__}.{name}")


def run_stage(name: str, params: Params, root: Path = Path(".")) -> Any:
    """Run a stage with only the params its spec declares; a tracking server lost on the way
    becomes a TrackingLost that names it."""
    module = load(name)
    try:
        return module.run(module.SPEC.view(params), root)
    except Exception as exc:
        if (lost := store.lost_server(exc, name)) is not None:
            raise lost from exc
        raise
