"""Does aligning the prior with the SSL encoder (REPA, `prior.align_weight`) speed it up?

For each prior kind and seed, trains the prior twice with the workspace's params, once without
alignment and once with `--weight`/`--depth`, from the same init, batches, noise and dropout
draws (the alignment head has its own RNG). Every `--every` steps it samples `--per-class`
images per class from the EMA weights (the weights the stage would save) and scores them with
the evaluator judge: class consistency and FID ratio (FID to the test split over FID of as
many held-out real images, from val). It prints the first checkpoint reaching each bar, then
the final figures at `--final-per-class` (evaluate's default, 100) with mean +- std over
seeds. Checkpoint figures use fewer samples than the final ones, so the FID ratio there is
noisier and reads lower: the floor (real against real) shrinks about as 1/N, a generator's
distance to the test set does not. The bar is judged on them as measured. Needs `pretrain`,
`judges` and `tokenize` outputs in ROOT (e.g. `dvc repro tokenize judges`).

    python bench/repa_bench.py [ROOT] [--kinds ar,diffusion] [--seeds 0,1,2] [--every 200]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from genpipe import artifacts
from genpipe.artifacts.codes import load_codes
from genpipe.artifacts.judges import load_judge
from genpipe.artifacts.tokenizer import load_tokenizer
from genpipe.config import Params, load_params
from genpipe.data.prepared import load_split
from genpipe.evaluation import (
    FeatureExtractor,
    class_consistency,
    fid,
    floor_sample,
    generate,
)
from genpipe.generator import Generator
from genpipe.models.align import AlignedPrior
from genpipe.models.priors import prior_kind
from genpipe.models.priors.base import CodeSpace
from genpipe.runtime import cpu_threads, pick_device, to_device
from genpipe.stages import prior

EVAL_SEED = 1234  # the same draws score every model
ALIGNMENTS = {"both": (False, True), "off": (False,), "on": (True,)}


@dataclass
class Run:
    kind: str
    seed: int
    aligned: bool
    points: list[dict[str, float]] = field(default_factory=list)  # step, consistency, fid_ratio
    final: dict[str, float] = field(default_factory=dict)
    train_seconds: float = 0.0


class Judge:
    """Consistency and FID ratio of a generator's samples, with the FID floor per sample
    count computed once."""

    def __init__(self, root: Path, num_classes: int) -> None:
        self.evaluator = load_judge(root, "evaluator", num_classes)
        self.extractor = FeatureExtractor(self.evaluator)
        self.test_x, _ = load_split("test", root / artifacts.PREPARED)
        self.val_x, self.val_y = load_split("val", root / artifacts.PREPARED)
        self.num_classes = num_classes
        self.floors: dict[int, float] = {}

    def floor(self, per_class: int) -> float:
        if per_class not in self.floors:
            # evaluate's floor images; the ratio here is of all samples (not at equal N), which
            # is enough to compare runs of this bench with one another
            real, _ = floor_sample(self.val_x, self.val_y, per_class, EVAL_SEED)
            self.floors[per_class] = fid(self.extractor, self.test_x, real)
        return self.floors[per_class]

    def __call__(self, gen: Generator, per_class: int) -> dict[str, float]:
        images, labels, _ = generate(gen, per_class, self.num_classes, EVAL_SEED)
        return {
            "consistency": class_consistency(self.evaluator, images, labels),
            "fid_ratio": fid(self.extractor, self.test_x, images) / self.floor(per_class),
        }


def train_one(
    params: Params, root: Path, judge: Judge, every: int, per_class: int, final_per_class: int
) -> Run:
    cfg = params.prior
    kind = prior_kind(cfg.kind)
    tokenizer = load_tokenizer(root / artifacts.TOKENIZER_FILE, params).eval()
    grid = tokenizer.grid(params.prepare.image_size)
    codes, y, _ = load_codes("train", root / artifacts.CODES)
    space = CodeSpace(tokenizer.codebook_size, grid, tokenizer.latent_dim, judge.num_classes)
    settings = kind.settings(cfg)
    sampling = {**kind.sampling(cfg), **kind.calibrate(tokenizer, codes)}
    x = kind.inputs(tokenizer, codes, sampling)
    aligned = cfg.align_weight > 0
    targets = prior.alignment_targets(params, root, y, grid) if aligned else None
    run = Run(cfg.kind, params.base.seed, aligned)
    eval_seconds = 0.0
    with tempfile.TemporaryDirectory() as scratch:  # no checkpoints left in ROOT
        ctx = prior.SPEC.start(params, Path(scratch), deps=())
        # the stage's device (CUDA when present): the prior, its data and the sampling tokenizer
        tokenizer.to(ctx.device)
        x, y = to_device(x, ctx.device), to_device(y, ctx.device)
        if targets is not None:
            targets = to_device(targets, ctx.device)
        model = kind.build(kind.from_params(cfg, space)).to(ctx.device)
        decay = cfg.optim.ema_decay
        ema = copy.deepcopy(model).eval().requires_grad_(False)  # fit's EMA, replayed

        def measure(step: int, trained: nn.Module) -> None:
            nonlocal eval_seconds
            net = trained.net if isinstance(trained, AlignedPrior) else trained
            with torch.no_grad():
                for e, p in zip(ema.parameters(), net.parameters(), strict=True):
                    e.copy_(p) if decay == 0 else e.lerp_(p, 1 - decay)
            if (step + 1) % every == 0:
                t0 = time.perf_counter()
                gen = Generator(tokenizer, ema, cfg.kind, sampling, settings)
                run.points.append({"step": step + 1, **judge(gen, per_class)})
                # each checkpoint as it comes, so a run stopped at a time limit leaves its curve
                point = run.points[-1]
                print(
                    f"{cfg.kind} seed {run.seed} align {'on' if aligned else 'off'} step "
                    f"{step + 1}: consistency {point['consistency']:.3f} "
                    f"FID ratio {point['fid_ratio']:.2f}",
                    flush=True,
                )
                eval_seconds += time.perf_counter() - t0

        start = time.perf_counter()
        final, _ = prior.train(params, kind, model, settings, x, y, ctx, measure, targets)
        run.train_seconds = time.perf_counter() - start - eval_seconds
    gen = Generator(tokenizer, final, cfg.kind, sampling, settings)
    run.final = judge(gen, final_per_class)
    return run


def first_step(points: list[dict[str, float]], key: str, bar: float, lower: bool) -> int | None:
    ok = (lambda v: v <= bar) if lower else (lambda v: v >= bar)
    return next((int(p["step"]) for p in points if ok(p[key])), None)


def mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} +- {sd:.3f}"


def steps_summary(steps: list[int | None], total: int) -> str:
    """Mean +- std of steps to the bar over the seeds that reached it, and how many did."""
    reached = [s for s in steps if s is not None]
    if not reached:
        return f">{total} (0/{len(steps)})"
    sd = statistics.stdev(reached) if len(reached) > 1 else 0.0
    return f"{statistics.mean(reached):.0f} +- {sd:.0f} ({len(reached)}/{len(steps)})"


def report(runs: list[Run], args: argparse.Namespace, total: int) -> list[dict[str, Any]]:
    rows = []
    print(
        f"\n| kind | alignment | steps to consistency >= {args.consistency_bar} | "
        f"steps to FID ratio <= {args.fid_bar} | final consistency | final FID ratio | "
        "train s |"
    )
    print("|---|---|---|---|---|---|---|")
    for kind in args.kinds:
        for aligned in (False, True):
            group = [r for r in runs if r.kind == kind and r.aligned == aligned]
            if not group:
                continue
            cons = [first_step(r.points, "consistency", args.consistency_bar, False) for r in group]
            fids = [first_step(r.points, "fid_ratio", args.fid_bar, True) for r in group]
            row = {
                "kind": kind,
                "alignment": f"w={args.weight}, block {args.depth}" if aligned else "off",
                "steps_to_consistency": steps_summary(cons, total),
                "steps_to_fid": steps_summary(fids, total),
                "final_consistency": mean_std([r.final["consistency"] for r in group]),
                "final_fid_ratio": mean_std([r.final["fid_ratio"] for r in group]),
                "train_seconds": mean_std([r.train_seconds for r in group]),
            }
            rows.append(row)
            print("| " + " | ".join(str(v) for v in row.values()) + " |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", nargs="?", type=Path, default=Path("."))
    ap.add_argument("--kinds", type=lambda s: s.split(","), default=["ar", "diffusion"])
    ap.add_argument("--seeds", type=lambda s: [int(v) for v in s.split(",")], default=[0, 1, 2])
    ap.add_argument("--weight", type=float, default=0.5, help="prior.align_weight when on")
    ap.add_argument("--depth", type=int, default=1, help="prior.align_depth when on")
    ap.add_argument(
        "--alignment", choices=("both", "off", "on"), default="both", help="which runs to train"
    )
    ap.add_argument("--steps", type=int, default=None, help="prior.optim.steps (default: params)")
    ap.add_argument("--every", type=int, default=200, help="steps between checkpoints")
    ap.add_argument("--per-class", type=int, default=50, help="samples per class at checkpoints")
    ap.add_argument("--final-per-class", type=int, default=100, help="samples per class, final")
    ap.add_argument("--consistency-bar", type=float, default=0.95)
    ap.add_argument("--fid-bar", type=float, default=3.0)
    ap.add_argument("--out", type=Path, default=None, help="write every figure here as JSON")
    args = ap.parse_args()
    base = load_params(args.root / "params.yaml")
    for needed in (artifacts.SSL_ENCODER, artifacts.CODES, artifacts.JUDGES):
        if not (args.root / needed).exists():
            sys.exit(f"{args.root / needed} is missing: run `dvc repro tokenize judges` first")
    _, train_y, _ = load_codes("train", args.root / artifacts.CODES)
    judge = Judge(args.root, int(train_y.max()) + 1)
    runs: list[Run] = []
    total = 0
    # one thread for the small ops of CPU training; on CUDA the host keeps all its threads for
    # the SSL targets and the judge
    with cpu_threads(pick_device(base.base.device)):
        for kind in args.kinds:
            for seed in args.seeds:
                for aligned in ALIGNMENTS[args.alignment]:
                    p = base.prior.model_copy(
                        update={
                            "kind": kind,
                            "align_weight": args.weight if aligned else 0.0,
                            "align_depth": args.depth,
                        }
                    )
                    if args.steps is not None:
                        p = p.model_copy(
                            update={"optim": p.optim.model_copy(update={"steps": args.steps})}
                        )
                    total = p.optim.steps
                    params = base.model_copy(
                        update={"prior": p, "base": base.base.model_copy(update={"seed": seed})}
                    )
                    run = train_one(
                        params, args.root, judge, args.every, args.per_class, args.final_per_class
                    )
                    runs.append(run)
                    curve = ", ".join(
                        f"{int(q['step'])}:{q['consistency']:.3f}/{q['fid_ratio']:.2f}"
                        for q in run.points
                    )
                    print(
                        f"{kind:<9} seed {seed} align {'on ' if aligned else 'off'} "
                        f"final consistency {run.final['consistency']:.3f} "
                        f"FID ratio {run.final['fid_ratio']:.2f} train {run.train_seconds:.0f}s "
                        f"| consistency/FID ratio by step {curve}",
                        flush=True,
                    )
    rows = report(runs, args, total)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        payload = {"args": {k: str(v) for k, v in vars(args).items()}, "summary": rows}
        payload["runs"] = [r.__dict__ for r in runs]
        args.out.write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
