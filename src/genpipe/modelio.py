"""Model files: architecture record + weights, refused with a clear message when they don't fit.

A model file is `{"kind", "arch", "state_dict", "extra"}` written by torch.save. `arch` holds
the constructor arguments, so a file can rebuild its own module, and a stage can check that
a file matches what its params ask for before using it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from genpipe.checkpoint import atomic_torch_save


class ModelFileError(ValueError):
    """A model file is missing, unreadable, of another kind or another architecture."""


def save_model(
    path: Path, kind: str, arch: dict[str, Any], module: nn.Module, **extra: Any
) -> None:
    state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    atomic_torch_save({"kind": kind, "arch": arch, "state_dict": state, "extra": extra}, path)


def read_model_file(path: Path, kind: str) -> dict[str, Any]:
    if not path.is_file():
        raise ModelFileError(f"{path}: missing; run the stage that makes it (`dvc repro`)")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same message
        raise ModelFileError(f"{path}: unreadable model file ({exc}); re-run its stage") from None
    if not isinstance(blob, dict) or blob.get("kind") != kind:
        found = blob.get("kind") if isinstance(blob, dict) else type(blob).__name__
        raise ModelFileError(f"{path}: expected a {kind} model file, found {found!r}")
    return blob


def load_model(
    path: Path,
    kind: str,
    build: Callable[..., nn.Module],
    expect_arch: dict[str, Any] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild and load a model; with `expect_arch`, refuse a file made for other params."""
    blob = read_model_file(path, kind)
    if expect_arch is not None and blob["arch"] != expect_arch:
        diff = {
            k: {"file": blob["arch"].get(k), "params": expect_arch.get(k)}
            for k in sorted(set(blob["arch"]) | set(expect_arch))
            if blob["arch"].get(k) != expect_arch.get(k)
        }
        raise ModelFileError(
            f"{path}: made for another {kind} architecture {diff}; re-run its stage "
            "(`dvc repro`) or restore the params it was made with"
        )
    module = build(**blob["arch"])
    try:
        module.load_state_dict(blob["state_dict"])
    except RuntimeError as exc:
        raise ModelFileError(f"{path}: weights do not fit the {kind} architecture: {exc}") from None
    return module.eval(), blob
