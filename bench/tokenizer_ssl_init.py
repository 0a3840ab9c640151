"""Does SSL pretraining speed the tokenizer up? Steps to the PSNR bar, SSL init vs scratch.

Trains the tokenizer twice with the workspace's params, same seed and batches, once from a
random encoder and once with `tokenizer.init_from_ssl: true` (the `pretrain` stage's encoder),
measures val PSNR every `--every` steps, and prints the first step at which each reaches
`--bar` dB, plus both final val/test PSNRs. Needs `dvc repro pretrain` (data/prepared and
models/pretrain/encoder.pt) in ROOT.

    python bench/tokenizer_ssl_init.py [ROOT] [--bar 24] [--every 10]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from genpipe import artifacts
from genpipe.artifacts.encoder import load_ssl_encoder
from genpipe.config import Params, load_params
from genpipe.data.prepared import load_split
from genpipe.evaluation import reconstruction
from genpipe.models.tokenizer import VQAutoencoder
from genpipe.stages import tokenizer


def curve(
    params: Params, root: Path, every: int, ssl: bool
) -> tuple[list[tuple[int, float]], dict[str, float], float]:
    """[(step, val PSNR)], final {split: PSNR}, seconds of training (evaluation excluded)."""
    cfg = params.tokenizer.model_copy(update={"init_from_ssl": ssl})
    params = params.model_copy(update={"tokenizer": cfg})
    train_x, _ = load_split("train", root / artifacts.PREPARED)
    val_x, _ = load_split("val", root / artifacts.PREPARED)
    test_x, _ = load_split("test", root / artifacts.PREPARED)
    encoder = load_ssl_encoder(params, root) if ssl else None
    points: list[tuple[int, float]] = []
    eval_seconds = 0.0

    def measure(step: int, model: VQAutoencoder) -> None:
        nonlocal eval_seconds
        if (step + 1) % every == 0:
            t = time.perf_counter()
            points.append((step + 1, reconstruction(model, val_x, ctx.device)["psnr"]))
            model.train()
            eval_seconds += time.perf_counter() - t

    with tempfile.TemporaryDirectory() as scratch:  # no checkpoints left in ROOT
        ctx = tokenizer.SPEC.start(params, Path(scratch), deps=())
        start = time.perf_counter()
        model, _ = tokenizer.train(params, train_x, ctx, encoder, on_step=measure)
        seconds = time.perf_counter() - start - eval_seconds
    final = {
        s: reconstruction(model, x, ctx.device)["psnr"]
        for s, x in (("val", val_x), ("test", test_x))
    }
    return points, final, seconds


def first_at(points: list[tuple[int, float]], bar: float) -> int | None:
    return next((step for step, psnr in points if psnr >= bar), None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", nargs="?", type=Path, default=Path("."))
    ap.add_argument("--bar", type=float, default=24.0, help="val PSNR (dB) to reach")
    ap.add_argument("--every", type=int, default=10, help="steps between measurements")
    args = ap.parse_args()
    params = load_params(args.root / "params.yaml")
    if not (args.root / artifacts.SSL_ENCODER).exists():
        sys.exit(f"{args.root / artifacts.SSL_ENCODER} is missing: run `dvc repro pretrain` first")
    steps = params.tokenizer.optim.steps
    print(f"tokenizer, {steps} steps, val PSNR every {args.every} steps, bar {args.bar} dB")
    print(f"{'init':<8} {'steps to bar':>12} {'val dB':>7} {'test dB':>7} {'train s':>7}")
    results = {}
    for name, ssl in (("scratch", False), ("ssl", True)):
        points, final, seconds = curve(params, args.root, args.every, ssl)
        reached = first_at(points, args.bar)
        results[name] = reached
        shown = reached if reached is not None else f">{steps}"
        print(f"{name:<8} {shown:>12} {final['val']:>7.2f} {final['test']:>7.2f} {seconds:>7.1f}")
        print(
            "  curve: " + ", ".join(f"{s}:{p:.1f}" for s, p in points[:: max(1, len(points) // 12)])
        )
    if results["scratch"] and results["ssl"]:
        print(f"ratio scratch/ssl steps to bar: {results['scratch'] / results['ssl']:.2f}x")


if __name__ == "__main__":
    main()
