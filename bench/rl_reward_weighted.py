"""Does online reward-weighted regression on the prior's own loss meet the RL bar?

GRPO/DDPO on the diffusion prior scores stochastic DDIM paths and barely moves the served
(ODE) sampler's reward (README, RL). This fits the reward-tilted marginal instead, with no
path log-probabilities (reward-weighted regression; for diffusion, reward-weighted flow
matching). Each round:
  (a) draw --group samples per class with the served sampler (seeded per round; with
      --pool fixed, once from the base prior, reused with the same weights every round:
      weighted maximum likelihood of one tilt, free of the drift of fitting its own draws),
  (b) score them with the reward,
  (c) weight them within each class by softmax(alpha * reward), alpha set so that the
      weights' KL to uniform, averaged over classes, is --delta nats (bisection; the
      per-class tilt of bench/rl_reward_gain.py),
  (d) take --steps-per-round optimiser steps of the prior's own training loss on those
      samples (their codes in the space the prior trains on), per sample, weighted.
Every --eval-every rounds it measures, as served, what bench/rl_reward_gain.py measures
(reward gain in pre-RL stds, the evaluator's consistency, FID, precision and recall on
--per-class samples per class) against the same bar: gain >= 2 stds, consistency down <= 2
points, FID <= 1.2x. KL: the sum of the rounds' deltas is the KL the rounds asked for; had
each round fitted its tilt exactly, it would bound the KL moved from below while the reward
climbs (each round's log-ratio lam_i r - log Z_i has a mean under the final model at least
its mean under its own tilt, delta_i), and for a Gaussian reward the composed tilts' KL is
(sum of sqrt(delta_i))^2. A partial fit moves less, so neither measures the KL moved; the
KL of the cheapest reweighting of the pre-RL samples that reaches the gain measured does
bound it from below (roughly: 1,000 samples).

  PYTHONPATH=src python bench/rl_reward_weighted.py --root ROOT --reward realism
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.rl_reward_gain import (  # noqa: E402
    BarCheck,
    add_pipeline_args,
    load,
    measure,
    print_row,
    reward_params,
    save_grids,
    solve_tilt,
    tilt,
    tilt_weights,
)
from genpipe import artifacts, evaluation  # noqa: E402
from genpipe.data.prepared import load_split  # noqa: E402
from genpipe.generator import Generator  # noqa: E402
from genpipe.runtime import cpu_threads  # noqa: E402

ROUND_SEED_OFFSET = 2_000_003  # the rounds' draws: a stream no evaluation or reward draws


def round_weights(
    rewards: torch.Tensor, labels: torch.Tensor, delta: float
) -> tuple[torch.Tensor, float]:
    """(weights (N,) summing to 1 over all samples, each class an equal share, alpha): the
    per-class softmax(alpha * reward) whose KL to uniform, averaged over classes, is delta."""
    alpha = solve_tilt(rewards, labels, 1, delta)
    if not math.isfinite(alpha):
        n = len(rewards)
        raise ValueError(f"no reweighting of {n} samples reaches KL {delta}: lower --delta")
    return tilt_weights(rewards, labels, alpha).float(), alpha


PLAIN = {"cfg_scale": 1.0, "top_k": None, "top_p": None}  # the net's own distribution


def weighted_loss(
    gen: Generator, x: torch.Tensor, labels: torch.Tensor, w: torch.Tensor, rng: torch.Generator
) -> torch.Tensor:
    """The prior's training loss with sample i weighted by w[i] (weights summing to 1 give the
    plain loss when equal)."""
    losses = gen.kind_of.sample_losses(gen.prior, gen.formulation, x, labels, rng)  # type: ignore[attr-defined]
    return (w.to(losses.dtype) * losses).sum()


def report(name: str, m: dict[str, Any], before: dict[str, Any]) -> BarCheck:
    """Print one measurement row; returns it against the bar."""
    bar = BarCheck.of(before, m)
    print(
        f"{name:<10} reward {m['reward_mean']:.4f} ± {m['reward_std']:.4f} gain {bar.gain:+.2f} "
        f"std | consistency {m['consistency']:.3f} ({-bar.drop:+.1f} pts) | FID {m['fid']:.3f} "
        f"(x{bar.fid_ratio:.2f}) | precision {m['precision']:.2f} recall {m['recall']:.2f}",
        flush=True,
    )
    return bar


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_pipeline_args(parser, "realism")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--group", type=int, default=50, help="samples per class per round")
    parser.add_argument("--delta", type=float, default=0.2, help="KL of each round's weights")
    parser.add_argument("--steps-per-round", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--grad-clip", type=float, default=1.0)
    parser.add_argument(
        "--anchor",
        type=float,
        default=0.0,
        help="weight of the plain training loss on as many train-split codes, added each step "
        "(a trust region towards the data the prior was trained on; 0 = off)",
    )
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--per-class", type=int, default=100, help="eval samples per class")
    parser.add_argument(
        "--fit-sampler",
        choices=("plain", "served"),
        default="plain",
        help="draw each round's samples without guidance or truncation (plain: a fixed point "
        "of the fit at equal weights) or as served (guided samples, fitted, compound CFG)",
    )
    parser.add_argument(
        "--fit-steps",
        type=int,
        default=None,
        help="sampling steps of each round's draws (diffusion; default: the prior file's)",
    )
    parser.add_argument(
        "--centred",
        action="store_true",
        help="weight by w - 1/N (the reweighting alone: equal weights then train nothing, so "
        "the fit does not drift where the net already fits its own samples)",
    )
    parser.add_argument(
        "--pool",
        choices=("online", "fixed"),
        default="online",
        help="online: each round draws from the current prior; fixed: one draw from the base "
        "prior, weighted once, refitted every round (weighted maximum likelihood of the tilt, "
        "whose fixed point at an infinite pool is the tilted prior itself: no self-fitting drift)",
    )
    parser.add_argument("--grids", type=Path, default=None, help="before.png, after.png here")
    args = parser.parse_args()
    if args.delta <= 0 or args.rounds < 1 or args.group < 2 or args.steps_per_round < 1:
        parser.error("--delta must be > 0, --rounds and --steps-per-round >= 1, --group >= 2")
    root = args.root
    params, cfg = reward_params(args)
    seed, knn = params.base.seed, params.evaluate.knn_k
    torch.manual_seed(seed)
    gen, judges, reward = load(root, params, cfg)
    if not hasattr(gen.kind_of, "sample_losses"):
        raise SystemExit(f"prior kind {gen.kind!r} has no per-sample loss (`sample_losses`)")
    num_classes = int(gen.prior.num_classes)  # type: ignore[arg-type]
    test_x, _ = load_split("test", root / artifacts.PREPARED)

    def evaluate() -> dict[str, Any]:
        return measure(
            gen, judges["evaluator"], reward, test_x, args.per_class, seed, knn, args.reward
        )

    gen.prior.requires_grad_(True)
    opt = torch.optim.AdamW(gen.prior.parameters(), lr=args.lr, weight_decay=0.0)
    rng = torch.Generator().manual_seed(seed)
    fit = dict(PLAIN) if args.fit_sampler == "plain" else {}
    if args.fit_steps is not None:
        fit["steps"] = args.fit_steps
    if args.anchor > 0:
        train_x, train_y = load_split("train", root / artifacts.PREPARED)
        with torch.no_grad():
            train_codes = gen.tokenizer.encode_codes(train_x)
        anchor_x = gen.kind_of.inputs(gen.tokenizer, train_codes, gen.sampling)
    start = time.perf_counter()
    with cpu_threads(torch.device("cpu")):
        before = evaluate()
        bar = report("before", before, before)  # the last round always replaces it
        deltas = []
        after = before
        for r in range(args.rounds):
            gen.prior.eval()
            if r == 0 or args.pool == "online":
                with torch.no_grad():
                    images, labels, codes = evaluation.generate(
                        gen, args.group, num_classes, seed + ROUND_SEED_OFFSET + r, **fit
                    )
                    rewards = reward(images, labels)[0]
                w, alpha = round_weights(rewards, labels, args.delta)
                if args.centred:
                    w = w - 1 / len(w)
                deltas.append(tilt(rewards, labels, alpha)[1])
                x = gen.kind_of.inputs(gen.tokenizer, codes, gen.sampling)
            gen.prior.train()
            for _ in range(args.steps_per_round):
                opt.zero_grad()
                loss = weighted_loss(gen, x, labels, w, rng)
                if args.anchor > 0:
                    idx = torch.randint(len(anchor_x), (len(x),), generator=rng)
                    even = torch.full((len(x),), 1 / len(x))
                    loss = loss + args.anchor * weighted_loss(
                        gen, anchor_x[idx], train_y[idx], even, rng
                    )
                loss.backward()
                torch.nn.utils.clip_grad_norm_(gen.prior.parameters(), args.grad_clip)
                opt.step()
            gen.prior.eval()
            print(
                f"round {r + 1}: {args.fit_sampler} {args.pool} pool reward "
                f"{float(rewards.mean()):.4f} "
                f"({(float(rewards.mean()) - before['reward_mean']) / before['reward_std']:+.2f} "
                f"std) alpha {alpha:.2f} loss {float(loss.detach()):.4f} "
                f"t={time.perf_counter() - start:.0f}s",
                flush=True,
            )
            if (r + 1) % args.eval_every == 0 or r + 1 == args.rounds:
                after = evaluate()
                bar = report(f"round {r + 1}", after, before)
    secs = time.perf_counter() - start
    kl_sum = sum(deltas)
    kl_gauss = sum(math.sqrt(d) for d in deltas) ** 2
    target = before["reward_mean"] + bar.gain * before["reward_std"]
    lam = solve_tilt(before["rewards"], before["labels"], 0, target)
    kl_tilt = tilt(before["rewards"], before["labels"], lam)[1] if math.isfinite(lam) else math.inf
    if args.grids is not None:
        save_grids(args.grids, before, after, args.per_class, num_classes)
    print(
        f"kind={gen.kind} reward={args.reward} rounds={args.rounds} group={args.group} "
        f"delta={args.delta} steps_per_round={args.steps_per_round} lr={args.lr} "
        f"fit_sampler={args.fit_sampler} fit_steps={args.fit_steps} anchor={args.anchor} "
        f"centred={args.centred} pool={args.pool} "
        f"secs={secs:.0f}"
    )
    print(
        f"KL asked for: sum of deltas {kl_sum:.2f}, as composed Gaussian tilts {kl_gauss:.2f}; "
        f"KL moved at least (cheapest reweighting of the pre-RL samples to this gain) "
        f"{kl_tilt:.2f}"
    )
    settings = (
        f"{args.rounds} rounds x {args.group}/class, delta {args.delta}, "
        f"{args.steps_per_round} steps, lr {args.lr}, {args.fit_sampler}, "
        f"anchor {args.anchor}{', centred' if args.centred else ''}"
        f"{', fixed pool' if args.pool == 'fixed' else ''}"
    )
    print_row(gen.kind, args.reward, settings, before, after, {"sum delta": f"{kl_sum:.2f}"})


if __name__ == "__main__":
    main()
