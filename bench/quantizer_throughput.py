"""Forward+backward throughput of our VectorQuantizer against vector_quantize_pytorch.

Both run in training mode with matched options (codebook size, dim, EMA decay, commitment
weight, dead-code threshold, cosine or not; k-means init off in both; plain straight-through,
so the other library's rotation trick is off). Timings alternate between the two so that load
from other processes hits both alike. Usage: `python bench/quantizer_throughput.py [--threads N]`.
On a busy machine run it with OMP_WAIT_POLICY=PASSIVE: spinning OpenMP threads that lose their
core to other processes otherwise dominate every timing.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn
from vector_quantize_pytorch import VectorQuantize

from genpipe.models.quantizer import VectorQuantizer

DIM, CODEBOOK, GRID = 64, 512, 8
DECAY, BETA, DEAD = 0.99, 0.25, 2.0


def ours(cosine: bool) -> nn.Module:
    return VectorQuantizer(
        DIM, CODEBOOK, beta=BETA, decay=DECAY, kmeans_init=False,
        dead_code_threshold=DEAD, cosine=cosine,
    )  # fmt: skip


def theirs(cosine: bool) -> nn.Module:
    return VectorQuantize(
        dim=DIM, codebook_size=CODEBOOK, decay=DECAY, commitment_weight=BETA, kmeans_init=False,
        threshold_ema_dead_code=DEAD, use_cosine_sim=cosine, rotation_trick=False,
        accept_image_fmap=True,
    )  # fmt: skip


def step_fn(vq: nn.Module, z: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        z.grad = None
        out = vq(z)
        z_q, loss = out[0], out[2]
        (z_q.square().mean() + loss).backward()

    return step


def seconds(step: Callable[[], None], iters: int) -> float:
    start = time.perf_counter()
    for _ in range(iters):
        step()
    return (time.perf_counter() - start) / iters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"K={CODEBOOK} dim={DIM} grid={GRID}x{GRID} decay={DECAY} beta={BETA} dead<{DEAD} "
          f"threads={args.threads}, median of {args.repeats}x{args.iters} steps")  # fmt: skip
    print(f"{'cosine':>6} {'batch':>5} {'vectors':>7} {'ours vec/s':>12} {'theirs vec/s':>12} "
          f"{'ratio':>6}")  # fmt: skip
    for cosine in (False, True):
        for batch in (16, 64, 256):
            z = torch.randn(batch, DIM, GRID, GRID, requires_grad=True)
            steps = {"ours": step_fn(ours(cosine), z), "theirs": step_fn(theirs(cosine), z)}
            for step in steps.values():
                seconds(step, 3)  # warmup
            times: dict[str, list[float]] = {"ours": [], "theirs": []}
            for _ in range(args.repeats):
                for name, step in steps.items():
                    times[name].append(seconds(step, args.iters))
            n = batch * GRID * GRID
            rate = {name: n / statistics.median(t) for name, t in times.items()}
            print(f"{cosine!s:>6} {batch:>5} {n:>7} {rate['ours']:>12,.0f} "
                  f"{rate['theirs']:>12,.0f} {rate['ours'] / rate['theirs']:>6.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
