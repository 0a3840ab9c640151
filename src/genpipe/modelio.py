"""Model files: architecture record + weights, refused with a clear message when they don't fit.

A model file is `{"kind", "arch", "state_dict", "extra"}` written by torch.save. `arch` holds
the constructor arguments, so a file can rebuild its own module, and a stage can check that
a file matches what its params ask for before using it.

Model files also arrive from a DVC remote or an MLflow server, so they are read with
`weights_only=True`: tensors and plain data only. A pickle that would construct anything else
(and so could run code) is refused before any of it runs.
"""

from __future__ import annotations

import pickle
import re
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
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # the restricted unpickler stopped
        found = re.search(r"GLOBAL (\S+)", str(exc))
        if found is None:  # garbage, not a foreign object: torch's text advises weights_only=False
            raise ModelFileError(f"{path}: unreadable model file; re-run its stage") from None
        raise ModelFileError(
            f"{path}: refused: it holds a Python object ({found.group(1)}) beyond weights and "
            "plain data, which loading would run. genpipe does not write such files: re-run "
            "its stage, or fetch the file again from a source you trust"
        ) from None
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
