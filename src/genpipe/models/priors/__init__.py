"""Priors over a tokenizer's codes, one file per kind, and the registry that finds them.

Every module here but the shared ones (`SHARED`) defines `KIND`, a `base.PriorKind`;
`PRIOR_KINDS` maps each kind's name to it. Adding a kind is adding a file (plus its knobs in
config.Prior); `register` adds one defined elsewhere (a test, a plugin).
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from torch import nn

from genpipe.models.priors.base import PriorKind

SHARED = ("base", "transformer")  # modules of pieces the kinds share, not kinds


def _discover() -> dict[str, PriorKind]:
    kinds: dict[str, PriorKind] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name not in SHARED:
            kind = importlib.import_module(f"{__name__}.{info.name}").KIND
            kinds[kind.name] = kind
    return kinds


PRIOR_KINDS: dict[str, PriorKind] = _discover()


def register(kind: PriorKind) -> PriorKind:
    """Make `kind` available under its name (params, model files, the generator)."""
    PRIOR_KINDS[kind.name] = kind
    return kind


def prior_kind(name: Any) -> PriorKind:
    if name not in PRIOR_KINDS:
        raise ValueError(f"unknown prior kind {name!r}; allowed: {', '.join(PRIOR_KINDS)}")
    return PRIOR_KINDS[name]


def build_prior(name: str, arch: dict[str, Any]) -> nn.Module:
    return prior_kind(name).build(arch)
