"""Small pieces every training stage shares: run context, curves, split evaluation."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import torch

from genpipe import distributed, lineage
from genpipe.config import Params
from genpipe.training import Checkpoint, pick_device, seed_everything

CHECKPOINTS = Path("checkpoints")


@dataclass
class StageContext:
    device: torch.device
    generator: torch.Generator
    checkpoint: Checkpoint
    world: distributed.World


def start(
    stage: str,
    params: Params,
    sections: tuple[str, ...],
    deps: list[Path],
    root: Path,
    checkpoint_every: int,
) -> StageContext:
    """Seed, pick the device, join a torchrun process group if there is one, and find the
    resumable checkpoint for this exact params + inputs (saved by rank 0 only)."""
    world = distributed.init()
    generator = seed_everything(params.base.seed)
    device = pick_device(params.base.device)
    if device.type == "cuda" and world.size > 1:
        device = torch.device("cuda", torch.cuda.current_device())
    digests = "".join(lineage.dvc_md5(root / d) for d in deps if (root / d).exists())
    fingerprint = params.digest(*sections) + ":" + digests
    every = checkpoint_every if world.is_main else 0
    ckpt = Checkpoint(root / CHECKPOINTS / stage / "last.pt", fingerprint, every)
    return StageContext(device, generator, ckpt, world)


def write_curve(rows: list[dict[str, float]], path: Path) -> None:
    """A CSV that `dvc plots` draws (x = step)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()}
            )


@torch.no_grad()
def batched(fn, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Apply `fn` over `x` in chunks (evaluation over a whole split)."""
    return torch.cat([fn(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])
