"""Training plumbing shared by every stage: determinism, devices, optimisers, schedules,
EMA weights, resumable checkpoints and progress. Models never import this; stages do."""

from __future__ import annotations

import contextlib
import copy
import math
import os
import random
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm


def seed_everything(seed: int) -> torch.Generator:
    """Seed every RNG and make kernels deterministic; returns a generator for the stage's draws."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    deterministic_kernels()
    return torch.Generator().manual_seed(seed)


def deterministic_kernels() -> None:
    """Deterministic kernels (warn where none exists). The public switch also imports Inductor
    to set its deterministic mode, ~3.5 s at every stage start; only torch.compile, which
    genpipe uses on CUDA alone, reads that mode, so CPU-only machines set the kernel flag alone."""
    if torch.cuda.is_available():
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        torch._C._set_deterministic_algorithms(True, warn_only=True)


@contextlib.contextmanager
def cpu_threads(device: torch.device, n: int = 1) -> Iterator[None]:
    """`n` intra-op threads on CPU for a stretch of many small ops (RL batches of tens of
    samples, test-sized models): too small to split, and on a shared CPU OpenMP threads that
    wait on each other made such steps 10-20x slower than one thread (measured on 2 busy
    cores)."""
    before = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def pick_device(requested: str) -> torch.device:
    """`auto` takes CUDA when present; `cuda` without a GPU is an error, not a silent fallback."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            "base.device is 'cuda' but no CUDA device is visible; use 'auto' or 'cpu'"
        )
    return torch.device(requested)


def autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on CUDA; full precision on CPU so results are bit-reproducible there."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decoupled weight decay on matrices and conv kernels; none on norms, biases, embeddings."""
    decay, no_decay = [], []
    no_decay_types = (nn.Embedding, nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d)
    seen: set[int] = set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            if isinstance(module, no_decay_types) or p.ndim < 2 or name.endswith("bias"):
                no_decay.append(p)
            else:
                decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float = 0.1) -> float:
    """LR multiplier: linear warmup to 1, then cosine decay to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(
    model: nn.Module, lr: float, weight_decay: float, warmup: int, total: int, betas=(0.9, 0.99)
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    opt = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, warmup, total))
    return opt, sched


class EMA:
    """Exponential moving average of a model's weights, used for evaluation and sampling."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for ema_p, p in zip(self.model.parameters(), model.parameters(), strict=True):
            ema_p.lerp_(p.detach(), 1 - self.decay)
        for ema_b, b in zip(self.model.buffers(), model.buffers(), strict=True):
            ema_b.copy_(b)


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """Indices of the batch at `step`: a pure function of (seed, step), so resuming needs no
    sampler state. Epoch e is a permutation seeded by (seed, e); a last partial batch is dropped.
    """
    per_epoch = max(1, n // batch_size)
    epoch, k = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return perm[k * batch_size : (k + 1) * batch_size]


def atomic_torch_save(obj: Any, path: Path) -> None:
    """Write to a temporary sibling and rename, so an interrupt never leaves a torn file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "generator": generator.get_state()}


def set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])


def progress(total: int, desc: str, initial: int = 0) -> tqdm:
    """A progress bar on stderr; quiet when stderr is not a terminal, except for a few updates."""
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        file=sys.stderr,
        mininterval=0.5 if sys.stderr.isatty() else 10.0,
        dynamic_ncols=True,
        leave=False,
    )


def steps(start: int, total: int, desc: str) -> Iterator[int]:
    """Iterate training steps with a progress bar."""
    bar = progress(total, desc, initial=start)
    try:
        for step in range(start, total):
            yield step
            bar.update(1)
    finally:
        bar.close()


class Checkpoint:
    """Resumable training state under checkpoints/<stage>/last.pt.

    A checkpoint is only resumed when its fingerprint (params hash + input digests) matches the
    current run, so a changed param or dataset starts fresh instead of silently continuing.
    Removed once the stage has written its outputs.
    """

    def __init__(self, path: Path, fingerprint: str, every: int) -> None:
        self.path, self.fingerprint, self.every = path, fingerprint, every

    def load(self) -> dict[str, Any] | None:
        if not self.path.is_file():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=False)
        except Exception:  # noqa: BLE001 - a torn or foreign file is simply not resumable
            return None
        if not isinstance(state, dict) or state.get("fingerprint") != self.fingerprint:
            return None
        return state

    def maybe_save(self, step: int, total: int, state: dict[str, Any]) -> None:
        """Save after every `every` steps (not after the last: the outputs take over)."""
        done = step + 1
        if self.every > 0 and done % self.every == 0 and done < total:
            atomic_torch_save({**state, "step": done, "fingerprint": self.fingerprint}, self.path)

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)
