"""The one training loop (`fit`): optimiser and schedule, EMA weights, resume from and save to
a checkpoint (genpipe.checkpoint: weights, optimiser and every RNG), history and progress,
data parallel under torchrun (genpipe.distributed). Every stage that trains uses `fit`; RL
fine-tuning keeps its own loop but the same checkpoints, optimiser parameter groups, gradient
averaging and progress. Models never import this; stages do."""

from __future__ import annotations

import copy
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm import tqdm

from genpipe.checkpoint import Checkpoint
from genpipe.distributed import SINGLE, World
from genpipe.runtime import autocast, maybe_compile

if TYPE_CHECKING:
    from genpipe.config import Optim


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


def steps(start: int, total: int, desc: str, quiet: bool = False) -> Iterator[int]:
    """Iterate training steps with a progress bar (none when `quiet`: torchrun's other ranks)."""
    bar = progress(total, desc, initial=start) if not quiet else None
    try:
        for step in range(start, total):
            yield step
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()


History = list[dict[str, float]]
LOG_EVERY = 25  # steps between rows of the loss curve


def fit(
    model: nn.Module,
    cfg: Optim,
    loss_fn: Callable[[int], tuple[torch.Tensor, dict[str, Any]]],
    checkpoint: Checkpoint,
    desc: str,
    generators: Sequence[torch.Generator] = (),
    parts: dict[str, Any] | None = None,
    after_step: Callable[[int], None] | None = None,
    log_lr: bool = False,
    compile: bool = False,
    on_step: Callable[[int, nn.Module], None] | None = None,
    world: World = SINGLE,
    shared: Sequence[torch.Generator] = (),
) -> tuple[nn.Module, History]:
    """Train `model` for cfg.steps steps, from scratch or from `checkpoint`.

    `loss_fn(step)` returns the step's loss and named values for the curve (tensors are read
    only on logged steps). AdamW with decoupled weight decay, warmup + cosine schedule,
    gradient clipping, optional EMA weights; `parts` (anything with state_dict, e.g. a
    discriminator and its optimiser, updated in `after_step(step)`) and `generators` are
    saved with the checkpoint. `on_step(step, model)` runs last in each step (interrupt
    tests, benchmarks); `compile` (base.compile) runs the model through torch.compile on
    CUDA. Returns the
    EMA (or trained) model in eval mode and the curve.

    Under torchrun (`world`), `loss_fn` computes the loss of this rank's shard of the step's
    global batch (`world.shard`); the gradients are averaged over ranks before clipping,
    logged values are averaged too, and only rank 0's checkpoint saves (every rank resumes
    from it). `generators` draw per-sample noise, from per-rank forks during a step
    (`world.rank_streams`, as torch's global RNG); `shared` ones draw for the whole global
    batch, the same on every rank (e.g. augmentations applied before sharding).
    """
    world.sync_batchnorm(model)
    opt, sched = make_optimizer(model, cfg.lr, cfg.weight_decay, cfg.warmup_steps, cfg.steps)
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    saved: dict[str, Any] = {"model": model, "opt": opt, "sched": sched, **(parts or {})}
    if ema is not None:
        saved["ema"] = ema.model
    device = next(model.parameters()).device
    maybe_compile(model, compile, device)  # in place, after the EMA copy
    history: History = []
    start = 0
    every_generator = (*generators, *shared)
    if (state := checkpoint.resume(every_generator)) is not None:
        for key, obj in saved.items():
            obj.load_state_dict(state[key])
        history, start = state["history"], state["step"]
    world.sync_state(model)
    model.train()
    for step in steps(start, cfg.steps, desc, quiet=not world.is_main):
        with world.rank_streams(generators):
            with autocast(device):
                loss, logs = loss_fn(step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
        world.average_gradients(model)
        if cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        if after_step is not None:
            after_step(step)
        if ema is not None:
            ema.update(model)
        if step % LOG_EVERY == 0 or step == cfg.steps - 1:
            values = {k: v.item() if torch.is_tensor(v) else float(v) for k, v in logs.items()}
            row = {"step": step, **world.mean({"loss": loss.item(), **values})}
            history.append({**row, "lr": sched.get_last_lr()[0]} if log_lr else row)
        checkpoint.maybe_save(
            step,
            cfg.steps,
            {**{k: obj.state_dict() for k, obj in saved.items()}, "history": history},
            every_generator,
        )
        if on_step is not None:
            on_step(step, model)
    for m in (model, ema.model if ema is not None else model):
        world.local_batchnorm(m)
    return (ema.model if ema is not None else model).eval(), history
