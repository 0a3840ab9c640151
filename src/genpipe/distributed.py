"""Data-parallel training under `torchrun --nproc_per_node N`: every rank holds the same
replica, trains on its shard of each global batch, and the gradients are averaged.

Each step's global batch is the same function of (seed, step) as on one process; rank r
takes rows r, r+N, r+2N... of it, and the gradients are averaged with one all_reduce per
step, so N processes follow the single-process run up to floating-point summation order.
RL takes whole groups instead, each with its own noise (`group_generators`) and its own
gradient, summed in global group order (`sum_group_gradients`): the single process's bytes.
The averaging is done here rather than by nn.parallel.DistributedDataParallel, whose hooks
only see `forward`: prior kinds train through other methods (their `loss`).
BatchNorm statistics are taken over the global batch (`sync_batchnorm`), and `gather_rows`
puts a global batch back together where a loss needs all of it (SimCLR's negatives).
Per-sample noise comes from per-rank forks of the shared seeded streams (`rank_streams`).
Logging, checkpoints and outputs belong to rank 0. gloo on CPU, nccl on CUDA.
"""

from __future__ import annotations

import atexit
import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global batch (needs batch size divisible by world size)."""
        if len(batch) % self.size:
            raise ValueError(
                f"batch_size {len(batch)} must be divisible by the {self.size} processes"
            )
        return batch[self.rank :: self.size]

    def shard_groups(self, batch: torch.Tensor, group_size: int) -> torch.Tensor:
        """This rank's whole groups (rows g*G .. g*G+G-1 for groups g = rank, rank+N, ...), so a
        group's statistics (RL advantages) never straddle ranks."""
        groups = batch.view(-1, group_size, *batch.shape[1:])
        if len(groups) % self.size:
            raise ValueError(
                f"{len(groups)} groups per step (finetune.prompts_per_step) must be divisible "
                f"by the {self.size} processes"
            )
        return groups[self.rank :: self.size].flatten(0, 1)

    def gather_rows(self, shard: torch.Tensor) -> torch.Tensor:
        """The global batch from every rank's `shard` rows, in global order; differentiable
        (each rank's gradient reaches the rows it holds). Rows are placed by a sum, exact."""
        if self.size == 1:
            return shard
        full = shard.new_zeros(len(shard) * self.size, *shard.shape[1:])
        full = full.index_copy(0, self._rows(len(full), shard.device), shard)
        return sum_over_ranks(full)

    def gather_groups(self, shard: torch.Tensor, group_size: int) -> torch.Tensor:
        """The global batch from every rank's `shard_groups`, in global order (no gradient)."""
        if self.size == 1:
            return shard
        local = shard.detach().to(_comm_device()).contiguous()
        parts = [torch.empty_like(local) for _ in range(self.size)]
        dist.all_gather(parts, local)
        groups = torch.stack([p.view(-1, group_size, *p.shape[1:]) for p in parts], dim=1)
        # (groups per rank, ranks, G, ...) -> global group order
        return groups.flatten(0, 2).to(shard.device)

    def group_generators(self, generator: torch.Generator, groups: int) -> list[torch.Generator]:
        """A generator for each group this rank samples (global groups rank, rank+N, ...),
        seeded by one draw from the shared `generator` and the group's global index: group g
        draws the same noise whichever rank samples it, and every rank's shared stream moves
        on by the same one draw (so a checkpoint of it resumes every rank)."""
        if groups % self.size:
            raise ValueError(
                f"{groups} groups per step (finetune.prompts_per_step) must be divisible "
                f"by the {self.size} processes"
            )
        seed = int(torch.randint(2**62, (1,), generator=generator))
        return [
            torch.Generator(generator.device).manual_seed(_fork(seed, g))
            for g in range(self.rank, groups, self.size)
        ]

    def sum_group_gradients(
        self, params: Sequence[nn.Parameter], grads: Sequence[Sequence[torch.Tensor | None]]
    ) -> None:
        """Set each parameter's gradient to the sum of every rank's per-group gradients
        (`grads[i]`: this rank's group i, one entry per parameter, None where unused), added
        in global group order: the same additions as one process makes, so N processes give
        its bytes. Costs an all_gather of every group's gradient (groups x parameters), where
        averaging would cost one all_reduce of the parameters: RL's groups are few and its
        priors small. A gradient missing in every group stays None, as on one process."""
        rows = []
        for group in grads:
            pairs = zip(params, group, strict=True)
            flat = [p.new_zeros(p.shape) if g is None else g for p, g in pairs]
            seen = torch.tensor([g is not None for g in group], dtype=flat[0].dtype)
            rows.append(torch.cat([*(f.flatten() for f in flat), seen.to(flat[0].device)]))
        every = self.gather_groups(torch.stack(rows), 1)
        total = every[0]
        for row in every[1:]:
            total = total + row
        offset = 0
        for p, seen in zip(params, total[-len(params) :].tolist(), strict=True):
            p.grad = total[offset : offset + p.numel()].view_as(p).clone() if seen else None
            offset += p.numel()

    def _rows(self, n: int, device: torch.device) -> torch.Tensor:
        return torch.arange(self.rank, n, self.size, device=device)

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """Each value averaged over the ranks (one all_reduce), for logged metrics."""
        if self.size == 1 or not values:
            return values
        t = torch.tensor(list(values.values()), dtype=torch.float64, device=_comm_device())
        dist.all_reduce(t)
        return dict(zip(values, (t / self.size).tolist(), strict=True))

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def broadcast(self, t: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.broadcast(t, src=0)
        return t

    def average_gradients(self, module: nn.Module) -> None:
        """Average every trainable parameter's gradient over the ranks, in one flat all_reduce:
        what DistributedDataParallel does after backward. A gradient missing on a rank counts
        as zero there; one missing on every rank stays None (the optimiser skips it, as on one
        process)."""
        if self.size == 1:
            return
        params = [p for p in module.parameters() if p.requires_grad]
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
        present = torch.tensor([p.grad is not None for p in params], dtype=grads[0].dtype)
        flat = torch.cat([*(g.flatten() for g in grads), present.to(grads[0].device)])
        dist.all_reduce(flat)
        offset = 0
        for p, g, seen in zip(params, grads, flat[-len(params) :].tolist(), strict=True):
            mean = flat[offset : offset + g.numel()].view_as(g) / self.size
            p.grad = mean if seen else None
            offset += g.numel()

    def sync_state(self, module: nn.Module) -> None:
        """Rank 0's parameters and buffers on every rank (as DDP does when it wraps a model)."""
        if self.size == 1:
            return
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, src=0)

    def sync_batchnorm(self, module: nn.Module) -> nn.Module:
        """BatchNorm layers normalise by global-batch statistics while training, so a shard
        trains as its rows would in the whole batch (SyncBatchNorm is CUDA-only). Undone by
        `local_batchnorm`; parameters and buffers stay the same objects."""
        if self.size > 1:
            for m in module.modules():
                if isinstance(m, _BatchNorm) and not isinstance(m, GlobalBatchNorm):
                    m.local_class = m.__class__
                    m.__class__ = GlobalBatchNorm
        return module

    @staticmethod
    def local_batchnorm(module: nn.Module) -> nn.Module:
        """The BatchNorm classes `sync_batchnorm` replaced, back (for saving and serving)."""
        for m in module.modules():
            if isinstance(m, GlobalBatchNorm):
                m.__class__ = m.local_class
                del m.local_class
        return module

    @contextlib.contextmanager
    def rank_streams(self, generators: Sequence[torch.Generator]) -> Iterator[None]:
        """For one step, `generators` and torch's global RNG (dropout) draw from a fork of their
        shared stream for this rank, so ranks draw different noise for different rows; after
        it, every rank is back on the shared stream, one draw further on. The shared states
        are all a checkpoint needs (they are equal on every rank), so resuming stays exact.
        A single process draws from the shared streams themselves."""
        if self.size == 1:
            yield
            return
        seeds = [int(torch.randint(2**62, (1,), generator=g)) for g in generators]
        seed = int(torch.randint(2**62, (1,)))
        shared = [g.get_state() for g in generators]
        cpu, cuda = torch.get_rng_state(), _cuda_states()
        for g, s in zip(generators, seeds, strict=True):
            g.manual_seed(_fork(s, self.rank))
        torch.manual_seed(_fork(seed, self.rank))
        try:
            yield
        finally:
            for g, state in zip(generators, shared, strict=True):
                g.set_state(state)
            torch.set_rng_state(cpu)
            if cuda:
                torch.cuda.set_rng_state_all(cuda)


SINGLE = World()  # one process, no process group


def _comm_device() -> torch.device:
    """Where a collective's tensors must live: the rank's GPU under nccl, else the CPU."""
    if dist.get_backend() == dist.Backend.NCCL:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _fork(seed: int, rank: int) -> int:
    return (seed * 1_000_003 + rank) % 2**63


def _cuda_states() -> list[torch.Tensor]:
    return torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []


class _SumOverRanks(torch.autograd.Function):
    """all_reduce(sum) with a gradient: each rank's input gets the sum of every rank's
    gradient of the output, as every rank's loss depends on every input."""

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor) -> torch.Tensor:
        out = t.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)
        return grad


def sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    return _SumOverRanks.apply(t)


class GlobalBatchNorm(_BatchNorm):
    """BatchNorm whose training statistics span every rank's rows (differentiable all_reduce);
    in eval mode, and its state_dict, it is the BatchNorm it replaced."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {input.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = torch.tensor(float(x.numel() // x.shape[1]), device=x.device)
        dist.all_reduce(count)
        mean = sum_over_ranks(x.sum(dims)) / count
        centred = x - mean.view(shape)
        var = sum_over_ranks(centred.square().sum(dims)) / count
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked += 1  # type: ignore[operator]
                momentum = self.momentum
                if momentum is None:  # a cumulative average, as BatchNorm
                    momentum = 1 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach(), momentum)
                unbiased = var.detach() * count / (count - 1).clamp(min=1)
                self.running_var.lerp_(unbiased, momentum)  # type: ignore[union-attr]
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def init() -> World:
    """Join the process group torchrun describes in the environment; one process otherwise."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        atexit.register(dist.destroy_process_group)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return World(dist.get_rank(), dist.get_world_size())
