"""Resumable training state: atomic saves, and checkpoints that hold every RNG state so a
resumed run gives the same bytes as one never stopped."""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch


def atomic_torch_save(obj: Any, path: Path) -> None:
    """Write in a temporary folder of this call's own and rename, so an interrupt never
    leaves a torn file and two writers never share a temporary. The file keeps its name
    there: torch.save names the archive's root after it, so a temporary name would change
    the bytes (and every hash downstream) on each run."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        torch.save(obj, tmp_dir / path.name)
        (tmp_dir / path.name).replace(path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


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

    A checkpoint is only resumed when its fingerprint (params hash, input digests and the
    digest of the stage's code) matches the current run, so a changed param, dataset or
    code starts fresh instead of silently continuing. It holds the RNG states too, so a
    resumed run gives the same bytes as one never stopped. It is read with
    `weights_only=True` (tensors and plain containers only: a pickled object is refused);
    one that cannot be read so is set aside as `<name>.rejected`, with a message.
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
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - torn, foreign or a pickle payload
            return self._set_aside(f"unreadable ({type(exc).__name__}: {str(exc)[:200]})")
        if not isinstance(state, dict) or "rng" not in state or "fingerprint" not in state:
            return self._set_aside("not a genpipe checkpoint of this version")
        if state["fingerprint"] != self.fingerprint:
            print(
                f"{self.path}: saved for other params, inputs or code; starting fresh",
                file=sys.stderr,
            )
            return None
        return state

    def _set_aside(self, why: str) -> None:
        aside = self.path.with_name(self.path.name + ".rejected")
        self.path.replace(aside)
        print(f"{self.path}: {why}; set aside as {aside}, starting fresh", file=sys.stderr)

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
