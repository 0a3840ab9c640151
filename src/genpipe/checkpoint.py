"""Resumable training state: atomic saves, and checkpoints that hold every RNG state so a
resumed run gives the same bytes as one never stopped."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch


def atomic_torch_save(obj: Any, path: Path) -> None:
    """Write to a temporary sibling and rename, so an interrupt never leaves a torn file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def rng_state(generators: Sequence[torch.Generator]) -> dict[str, Any]:
    """Every RNG a training step draws from: torch's global ones (dropout, weight init, k-means
    restarts) and the stage's own generators."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generators": [g.get_state() for g in generators],
    }


def set_rng_state(state: dict[str, Any], generators: Sequence[torch.Generator]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    for g, saved in zip(generators, state["generators"], strict=True):
        g.set_state(saved)


class Checkpoint:
    """Resumable training state under checkpoints/<stage>/last.pt.

    A checkpoint is only resumed when its fingerprint (params hash + input digests) matches the
    current run, so a changed param or dataset starts fresh instead of silently continuing.
    It holds the RNG states too, so a resumed run gives the same bytes as one never stopped.
    Removed (with its `part`s) once the stage has written its outputs.
    """

    def __init__(self, path: Path, fingerprint: str, every: int) -> None:
        self.path, self.fingerprint, self.every = path, fingerprint, every

    def part(self, name: str, every: int) -> Checkpoint:
        """A second checkpoint of the same stage (e.g. one per judge), cleared with this one."""
        return Checkpoint(self.path.with_name(f"{name}.pt"), self.fingerprint, every)

    def load(self) -> dict[str, Any] | None:
        if not self.path.is_file():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=False)
        except Exception:  # noqa: BLE001 - a torn or foreign file is simply not resumable
            return None
        if not isinstance(state, dict) or state.get("fingerprint") != self.fingerprint:
            return None
        if "rng" not in state:  # written before checkpoints held the RNG states
            return None
        return state

    def resume(self, generators: Sequence[torch.Generator] = ()) -> dict[str, Any] | None:
        """The saved state, with every RNG set back to where it was; None to start fresh."""
        state = self.load()
        if state is not None:
            set_rng_state(state["rng"], generators)
        return state

    def maybe_save(
        self,
        step: int,
        total: int,
        state: dict[str, Any],
        generators: Sequence[torch.Generator] = (),
    ) -> None:
        """Save after every `every` steps (not after the last: the outputs take over)."""
        done = step + 1
        if self.every > 0 and done % self.every == 0 and done < total:
            saved = {**state, "step": done, "fingerprint": self.fingerprint}
            atomic_torch_save({**saved, "rng": rng_state(generators)}, self.path)

    def clear(self) -> None:
        if self.path.parent.is_dir():
            for path in self.path.parent.glob("*.pt"):
                path.unlink()
