"""Stage-2 prior benchmark: AR sampling with/without KV cache, AR training throughput and its
share of the measured matmul peak, diffusion sampling speed per sampler, and MaskGIT against AR
with its KV cache.

    python bench/prior_bench.py [--device cpu|cuda] [--threads N] [--only PART ...]
        [--batch B ...] [--samples N]

Timings are the best of a few repeats after a warm-up call; on a shared CPU they are noisy.

MaskGIT vs AR (`--only maskgit`): N samples at the same batch size, at each preset's prior size
and sampling settings (digits: 4x4 grid, dim 64, depth 3; mnist: 7x7, dim 128, depth 4), AR
with its KV cache against MaskGIT's parallel decoding in T steps, MaskGIT both unguided (its
default scale 1.0: one pass per step) and at AR's guidance (two passes). Both priors run in
the same process one after the other, so a shared CPU slows both alike; each figure is one
timed run of all samples after a warm-up batch. MaskGIT does T full passes over L cells where
AR with a cache does L single-cell steps, so it wins only where a step's fixed cost, not its
arithmetic, sets the pace: small batches, or a GPU.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from genpipe.models.diffusion import SAMPLERS, make_formulation, sample
from genpipe.models.priors.ar import ARPrior
from genpipe.models.priors.diffusion import Denoiser
from genpipe.models.priors.maskgit import MaskGITPrior, masking_schedule

# the prior defaults (params.yaml `prior`): AR and diffusion architectures
AR_ARCH = dict(dim=64, depth=3, heads=4, dropout=0.1, pos="learned")
DIFF_ARCH = dict(dim=64, depth=2, heads=4)
VOCAB, CLASSES, LATENT_DIM = 128, 10, 4
# MaskGIT vs AR per preset: grid, prior arch and AR's sampling (presets/<name>.yaml `prior`)
PRESETS = {
    "digits": ((4, 4), AR_ARCH, dict(cfg_scale=2.0, top_p=0.95)),
    "mnist": (
        (7, 7),
        dict(dim=128, depth=4, heads=4, dropout=0.0, pos="learned"),
        dict(cfg_scale=1.5, top_p=0.95),
    ),
}
MASKGIT_STEPS = (8, 12)
PARTS = ("ar", "train", "diffusion", "maskgit")


def timed(fn: Callable[[], object], device: torch.device, repeats: int = 3, warmup: bool = True):
    """Seconds per call: the best of `repeats` calls (after a warm-up call), the least disturbed
    by other processes on a shared machine."""
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def matmul_peak(device: torch.device) -> float:
    """FLOP/s of a large square matmul in the dtype training runs in (bf16 on CUDA)."""
    n = 8192 if device.type == "cuda" else 2048
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / timed(lambda: a @ b, device, repeats=5)


def bench_ar_sampling(device: torch.device, grid: tuple[int, int], n: int = 64) -> None:
    torch.manual_seed(0)
    model = ARPrior(VOCAB, grid, CLASSES, **AR_ARCH).to(device).eval()
    labels = torch.arange(n, device=device) % CLASSES
    result = {}
    for use_cache in (True, False):

        def run(use_cache: bool = use_cache) -> None:
            g = torch.Generator().manual_seed(0)
            with autocast(device):
                model.sample(labels, g, cfg_scale=2.0, use_cache=use_cache)

        # the uncached run is long enough to need no warm-up (the cached one warmed the code)
        result[use_cache] = timed(run, device, repeats=3 if use_cache else 1, warmup=use_cache)
    print(
        f"AR sampling {n} samples, grid {grid[0]}x{grid[1]} ({grid[0] * grid[1]} codes), CFG on: "
        f"KV cache {result[True]:.3f} s, no cache {result[False]:.3f} s, "
        f"speed-up {result[False] / result[True]:.1f}x"
    )


def ar_train_flops_per_token(model: ARPrior) -> float:
    """Matmul FLOPs per trained token: 6 x non-embedding params (forward 2, backward 4) plus
    attention scores and mixing, 6 x 2 x depth x dim x seq_len (nanoGPT/PaLM appendix B)."""
    n_params = sum(p.numel() for p in model.parameters())
    n_params -= model.tok_emb.weight.numel() + model.class_emb.weight.numel()
    if model.pos == "learned":
        n_params -= model.pos_emb.weight.numel()
    dim = model.head.in_features
    return 6 * n_params + 12 * model.depth * dim * model.seq_len


def bench_ar_training(device: torch.device, arch: dict, batch: int) -> None:
    """Training steps/s and achieved matmul FLOP/s against the peak measured just before."""
    peak = matmul_peak(device)
    torch.manual_seed(0)
    grid = (4, 4)
    model = ARPrior(VOCAB, grid, CLASSES, **arch).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator(device=device).manual_seed(0)
    codes = torch.randint(0, VOCAB, (batch, 16), device=device, generator=g)
    labels = torch.randint(0, CLASSES, (batch,), device=device, generator=g)
    dg = torch.Generator().manual_seed(0)

    def step() -> None:
        for _ in range(5):
            with autocast(device):
                loss = model.loss(codes, labels, dg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    seconds = timed(step, device) / 5
    tokens = batch * model.seq_len
    flops = ar_train_flops_per_token(model) * tokens / seconds
    print(
        f"AR training {arch} batch {batch}: {tokens / seconds:,.0f} codes/s, "
        f"{flops / 1e9:.1f} GFLOP/s = {100 * flops / peak:.0f}% of matmul peak "
        f"({peak / 1e9:.1f} GFLOP/s)"
    )


def bench_diffusion(device: torch.device, n: int = 64, steps: int = 20) -> None:
    torch.manual_seed(0)
    net = Denoiser(LATENT_DIM, (4, 4), CLASSES, **DIFF_ARCH).to(device).eval()
    form = make_formulation("flow_matching")
    labels = torch.arange(n, device=device) % CLASSES
    for sampler in SAMPLERS:
        nfe = 2 * steps - 1 if sampler == "heun" else steps

        def run(sampler: str = sampler) -> None:
            g = torch.Generator().manual_seed(0)
            eta = 1.0 if sampler == "ddim" else 0.0
            with autocast(device):
                sample(net, form, labels, g, steps, sampler, cfg_scale=2.0, eta=eta)

        seconds = timed(run, device)
        print(
            f"diffusion {sampler:5s} {n} samples x {steps} steps ({nfe} NFE, CFG on): "
            f"{seconds:.3f} s, {n / seconds:,.0f} images/s, "
            f"{n * nfe / seconds:,.0f} image-NFE/s"
        )


def samples_per_second(model, device: torch.device, n: int, batch: int, **kw) -> float:
    """Throughput of drawing n samples, batch at a time, classes cycling."""
    labels = torch.arange(batch, device=device) % CLASSES
    g = torch.Generator().manual_seed(0)

    def run(batches: int) -> None:
        with autocast(device), torch.no_grad():
            for _ in range(batches):
                model.sample(labels, g, temperature=1.0, **kw)

    run(1)  # warm-up
    return n / timed(lambda: run(n // batch), device, repeats=1, warmup=False)


def sampling_flops(grid: tuple[int, int], dim: int, depth: int, steps: int | None) -> float:
    """Matmul FLOPs to draw one unguided sample (twice that guided): AR with its KV cache
    (`steps` None) runs each of the L cells through the blocks once, attending to the cells
    before it; MaskGIT runs all L cells through the blocks at each of its T steps and the head
    on the cells still masked. Per cell and block: qkv, output and MLP projections (24 dim^2)
    plus attention scores and mixing (4 dim x cells attended)."""
    cells = grid[0] * grid[1]
    if steps is None:
        blocks = sum(24 * dim**2 + 4 * dim * (i + 1) for i in range(cells))
        return depth * blocks + 2 * dim * VOCAB * cells
    masked = [cells, *masking_schedule(cells, steps)[:-1]]
    return steps * depth * cells * (24 * dim**2 + 4 * dim * cells) + 2 * dim * VOCAB * sum(masked)


def bench_maskgit(
    device: torch.device, batches: list[int], n: int, steps: list[int], presets: list[str]
) -> None:
    """MaskGIT's sampling speed as a multiple of AR's with its KV cache (the bar: >= 3x)."""
    for preset in presets:
        grid, arch, sampling = PRESETS[preset]
        torch.manual_seed(0)
        ar = ARPrior(VOCAB, grid, CLASSES, **arch).to(device).eval()
        mg = MaskGITPrior(VOCAB, grid, CLASSES, **arch).to(device).eval()
        ar_flops = sampling_flops(grid, arch["dim"], arch["depth"], None)
        print(
            f"{preset}: matmul MFLOPs per unguided sample: AR+KV cache {ar_flops / 1e6:.1f}, "
            + ", ".join(
                f"MaskGIT T={t} {sampling_flops(grid, arch['dim'], arch['depth'], t) / 1e6:.1f} "
                f"({sampling_flops(grid, arch['dim'], arch['depth'], t) / ar_flops:.1f}x)"
                for t in steps
            )
            + f"; sequential steps: AR {grid[0] * grid[1]}, MaskGIT {steps}",
            flush=True,
        )
        for batch in batches:
            base = samples_per_second(ar, device, n, batch, use_cache=True, **sampling)
            line = (
                f"{preset} grid {grid[0]}x{grid[1]}, batch {batch}: AR+KV cache "
                f"(cfg {sampling['cfg_scale']}) {base:,.0f} samples/s"
            )
            for t in steps:
                for cfg_scale in (1.0, sampling["cfg_scale"]):
                    rate = samples_per_second(
                        mg, device, n, batch, steps=t, cfg_scale=cfg_scale, top_p=0.95
                    )
                    line += f"; MaskGIT T={t} cfg {cfg_scale} {rate / base:.2f}x"
            print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch default)")
    parser.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--batch", type=int, nargs="+", default=[10, 50, 250], help="maskgit")
    parser.add_argument("--samples", type=int, default=1000, help="maskgit")
    parser.add_argument("--steps", type=int, nargs="+", default=list(MASKGIT_STEPS), help="maskgit")
    parser.add_argument(
        "--presets", nargs="+", choices=list(PRESETS), default=list(PRESETS), help="maskgit"
    )
    args = parser.parse_args()
    for batch in args.batch:
        if args.samples % batch:
            parser.error(f"--samples ({args.samples}) must be a multiple of --batch ({batch})")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"device {device}, {torch.get_num_threads()} CPU threads, torch {torch.__version__}")
    if "ar" in args.only:
        for grid in ((4, 4), (16, 16)):
            bench_ar_sampling(device, grid)
    if "train" in args.only:
        bench_ar_training(device, AR_ARCH, batch=64)
        bench_ar_training(device, dict(dim=256, depth=4, heads=4, pos="learned"), batch=256)
    if "diffusion" in args.only:
        bench_diffusion(device)
    if "maskgit" in args.only:
        bench_maskgit(device, args.batch, args.samples, args.steps, args.presets)


if __name__ == "__main__":
    main()
