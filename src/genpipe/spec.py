"""A stage's declaration (name, params, deps, outs) and what every stage run does with it.

The spec is the one place a stage's identity is written: its run context (seed, device,
process group, resumable checkpoint), its MLflow run, its all-or-nothing outputs and its
dvc.yaml entry (genpipe.dvcyaml) all read it. `view` hands a stage only the params its spec
declares, so reading an undeclared section fails instead of escaping DVC's notice.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from genpipe import distributed, lineage, locks
from genpipe.checkpoint import Checkpoint
from genpipe.config import Params, ParamsError
from genpipe.outputs import staged
from genpipe.runtime import pick_device, seed_everything
from genpipe.tracking import store
from genpipe.tracking import write as tracking

CHECKPOINTS = Path("checkpoints")
LOCKS = Path(".genpipe/locks")


@dataclass(frozen=True)
class StageSpec:
    """`params`: sections (`prior`) or dotted keys (`tokenizer.channels`) the stage reads
    besides `base`; `deps`: files and folders other stages make; `outs`: what DVC caches;
    `metrics` and `plots`: uncached outputs; `cache` False keeps `outs` out of DVC's cache;
    `entry_points`: a dotted params key of {name: "module:function"} whose modules (the
    user's own code, e.g. rewards) are code deps too."""

    name: str
    params: tuple[str, ...]
    deps: tuple[Path, ...]
    outs: tuple[Path, ...] = ()
    metrics: Path | None = None
    plots: Path | None = None
    cache: bool = True
    entry_points: str | None = None

    @property
    def written(self) -> tuple[Path, ...]:
        """Every output, in the order `record` yields their temporary paths."""
        return (*self.outs, *(p for p in (self.metrics, self.plots) if p is not None))

    def start(
        self,
        params: Params,
        root: Path,
        checkpoint_every: int = 0,
        deps: tuple[Path, ...] | None = None,
    ) -> StageContext:
        """Check the tracking server answers, seed, pick the device, join a torchrun process
        group if there is one, and find the resumable checkpoint for this exact params,
        inputs and code (saved by rank 0 only)."""
        store.check_reachable()
        world = distributed.init()
        device = pick_device(params.base.device)
        generator = seed_everything(params.base.seed, device)
        if device.type == "cuda" and world.size > 1:
            device = torch.device("cuda", torch.cuda.current_device())
        used = self.deps if deps is None else deps
        digests = "".join(lineage.dvc_md5(root / d) for d in used if (root / d).exists())
        fingerprint = f"{params.digest(*self.params)}:{digests}:{self.code_digest(params, root)}"
        every = checkpoint_every if world.is_main else 0
        ckpt = Checkpoint(root / CHECKPOINTS / self.name / "last.pt", fingerprint, every)
        return StageContext(device, generator, ckpt, world, params.base.compile)

    def code_digest(self, params: Params, root: Path) -> str:
        """md5 of the stage's code: its module's import closure (dvc.yaml's code deps) and
        the user modules its entry points name."""
        from genpipe import dvcyaml  # it imports this module

        src = Path(__file__).resolve().parents[1]
        files = dvcyaml.code_deps(f"genpipe.stages.{self.name}", src)
        files += dvcyaml.entry_point_files(self, params, root)
        h = hashlib.md5()
        for f in files:
            h.update(f"{f.name}:{lineage.file_md5(f)}\n".encode())
        return h.hexdigest()

    @contextlib.contextmanager
    def record(
        self, params: Params, root: Path, deps: tuple[Path, ...] | None = None
    ) -> Iterator[tuple[tracking.StageRun, list[Path]]]:
        """The stage's MLflow run and temporary paths for `written`, renamed into place only
        if the body succeeds. Holds the stage's lock: a second run of this stage in this
        checkout is refused (locks.Busy), naming the running one's pid."""
        used = list(self.deps if deps is None else deps)
        written = list(self.written)
        with (
            locks.exclusive(root / LOCKS / f"{self.name}.lock", f"stage {self.name}"),
            tracking.stage_run(self.name, params, self.params, used, root, outs=written) as run,
            staged(*(root / p for p in written)) as paths,
        ):
            yield run, paths

    def view(self, params: Params) -> Any:
        """`params` restricted to `base` and what this spec declares."""
        return _Restricted(params, self.name, ("base", *self.params))


@dataclass
class StageContext:
    device: torch.device
    generator: torch.Generator
    checkpoint: Checkpoint
    world: distributed.World
    compile: bool = False  # base.compile: torch.compile what a training loop trains (CUDA)


class _Restricted:
    """Attribute access to params, refused outside the declared sections and keys."""

    def __init__(self, target: Any, stage: str, keys: tuple[str, ...], prefix: str = "") -> None:
        self._target, self._stage, self._keys, self._prefix = target, stage, keys, prefix

    def __getattr__(self, name: str) -> Any:
        if name in ("digest", "pick", "model_dump", "model_copy"):
            return getattr(self._target, name)
        key = f"{self._prefix}{name}"
        if any(key == k or key.startswith(k + ".") for k in self._keys):
            return getattr(self._target, name)
        if any(k.startswith(key + ".") for k in self._keys):
            return _Restricted(getattr(self._target, name), self._stage, self._keys, key + ".")
        raise ParamsError(
            f"stage {self._stage} reads params `{key}`, which its spec does not declare: "
            f"add it to the spec's params in genpipe/stages/{self._stage}.py and run "
            "`genpipe dvc-yaml` so DVC re-runs the stage when it changes"
        )
