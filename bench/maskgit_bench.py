"""MaskGIT vs AR sampling speed: 1,000 samples at the same batch size, AR with its KV cache
against MaskGIT's parallel decoding in T steps, at equal width and depth, with CFG on and the
prior's default sampling settings for both.

    python bench/maskgit_bench.py [--device cpu|cuda] [--threads N] [--batch B ...] [--samples N]

Both priors run in the same process, one after the other per grid and batch size, so a shared
CPU slows both alike and the ratio stays fair; each figure is one timed run of all samples
after a warm-up batch. MaskGIT does T x L token-passes per sample where AR with a cache does L,
so it wins only where a step's fixed cost, not its arithmetic, sets the pace: small batches,
or a GPU.
"""

from __future__ import annotations

import argparse

import torch
from prior_bench import AR_ARCH, CLASSES, VOCAB, autocast, timed

from genpipe.models.priors.ar import ARPrior
from genpipe.models.priors.maskgit import MaskGITPrior

SAMPLING = dict(cfg_scale=2.0, temperature=1.0, top_p=0.95)  # params.yaml `prior`
GRIDS = ((4, 4), (7, 7))  # digits at 16 px, MNIST with one more down-sampling level
STEPS = (8, 12)


def samples_per_second(model, device: torch.device, n: int, batch: int, **kw) -> float:
    """Throughput of drawing n samples, batch at a time, classes cycling."""
    labels = torch.arange(batch, device=device) % CLASSES
    g = torch.Generator().manual_seed(0)

    def run(batches: int) -> None:
        with autocast(device):
            for _ in range(batches):
                model.sample(labels, g, **SAMPLING, **kw)

    run(1)  # warm-up
    return n / timed(lambda: run(n // batch), device, repeats=1, warmup=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch default)")
    parser.add_argument("--batch", type=int, nargs="+", default=[10, 250])
    parser.add_argument("--samples", type=int, default=1000)
    args = parser.parse_args()
    for batch in args.batch:
        if args.samples % batch:
            parser.error(f"--samples ({args.samples}) must be a multiple of --batch ({batch})")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(
        f"device {device}, {torch.get_num_threads()} CPU threads, torch {torch.__version__}; "
        f"{args.samples} samples per figure; arch {AR_ARCH}; sampling {SAMPLING}"
    )
    for grid in GRIDS:
        torch.manual_seed(0)
        ar = ARPrior(VOCAB, grid, CLASSES, **AR_ARCH).to(device).eval()
        mg = MaskGITPrior(VOCAB, grid, CLASSES, **AR_ARCH).to(device).eval()
        for batch in args.batch:
            base = samples_per_second(ar, device, args.samples, batch, use_cache=True)
            line = f"grid {grid[0]}x{grid[1]}, batch {batch}: AR+KV cache {base:,.0f} samples/s"
            for steps in STEPS:
                rate = samples_per_second(mg, device, args.samples, batch, steps=steps)
                line += f"; MaskGIT T={steps} {rate:,.0f} samples/s ({rate / base:.1f}x)"
            print(line, flush=True)


if __name__ == "__main__":
    main()
