"""Does fine-tuning the diffusion prior along the reward's gradient, through the sampler it is
served with, meet the RL bar?

GRPO/DDPO scores stochastic DDIM paths and barely moves what the served sampler draws (README,
RL): the served sampler is the deterministic probability-flow ODE. Deterministic, it is a
differentiable map noise -> latents; the latents snap to their nearest codes and decode to
the image the reward scores. So a reward that is differentiable in the image can be
backpropagated into the denoiser through the last --grad-steps ODE steps (DRaFT-K, Clark et
al. 2024; AlignProp), the snap passed straight through (the forward pass decodes exactly the
served codes). Each step draws --group samples per class from fresh seeded noise, with the
prior file's sampler, steps and guidance, and takes one AdamW step of

    loss = - mean reward + beta * drift,

drift: over the graded steps, |d tau| times the mean squared difference of the ODE's
derivative under the net and under the frozen prior, at the states visited. For the SDE with
the same marginals the path KL is an integral of that kind (Girsanov); here it is a trust
region towards the prior, not a KL of the codes. Every --eval-every steps it measures, as
served, what bench/rl_reward_gain.py measures (reward gain in pre-RL stds, the evaluator's
consistency, FID, precision and recall on --per-class samples per class) against the same bar:
gain >= 2 stds, consistency down <= 2 points, FID <= 1.2x. --interpolate A also measures the
prior + A (final - prior).

  PYTHONPATH=src python bench/rl_reward_gradient.py --root ROOT --reward realism
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.rl_reward_gain import (  # noqa: E402
    add_pipeline_args,
    load,
    measure,
    print_row,
    reward_params,
    save_grids,
)
from bench.rl_reward_weighted import report  # noqa: E402
from genpipe import artifacts  # noqa: E402
from genpipe.data.prepared import load_split  # noqa: E402
from genpipe.generator import Generator  # noqa: E402
from genpipe.models.diffusion import (  # noqa: E402
    OdeStep,
    integrate_ode,
    make_formulation,
    ode_derivative,
)
from genpipe.models.priors.diffusion import Denoiser, from_prior_space  # noqa: E402
from genpipe.rewards import RewardFn  # noqa: E402
from genpipe.runtime import cpu_threads  # noqa: E402
from genpipe.stages import finetune  # noqa: E402

STEP_SEED_OFFSET = 3_000_017  # the steps' noise: a stream no evaluation or reward draws


class ServedSampler:
    """The prior file's ODE sampler, run with autograd through its last `grad_steps` steps,
    and decoded through the tokenizer with the snap to codes passed straight through."""

    def __init__(
        self, gen: Generator, reference: Denoiser, grad_steps: int, temperature: float = 0.0
    ) -> None:
        s = gen.sampling
        if s.get("sampler", "euler") not in ("euler", "heun"):
            raise SystemExit(
                f"the prior samples with {s.get('sampler')!r}; the reward gradient needs the "
                "deterministic ODE (prior.sampler: euler or heun)"
            )
        if gen.formulation is None:
            raise SystemExit("the prior is not a diffusion prior (no formulation)")
        self.gen, self.reference = gen, reference
        self.form = make_formulation(**gen.formulation)
        self.steps, self.grad_steps = int(s.get("steps", 20)), grad_steps
        self.cfg_scale = float(s.get("cfg_scale", 1.0))
        self.interval = tuple(s.get("guidance_interval", (0.0, 1.0)))
        self.temperature = temperature
        if temperature > 0:  # the soft snap's codes (K, D), and its tau: `temperature` times
            # the mean squared distance of a code to its nearest other
            k = gen.tokenizer.codebook_size
            with torch.no_grad():
                grid = gen.tokenizer.codes_to_latent(torch.arange(k).view(1, k, 1))
                self.codebook = grid[0, :, :, 0].T
                gaps = torch.cdist(self.codebook, self.codebook).fill_diagonal_(torch.inf).min(1)
            self.tau = temperature * float(gaps.values.pow(2).mean())

    def images(self, labels: torch.Tensor, rng: torch.Generator):
        """(images (B, C, H, W) with a graph to the net, graded ODE steps)."""
        net = self.gen.prior
        assert isinstance(net, Denoiser)
        x, graded = integrate_ode(
            net,
            self.form,
            labels,
            rng,
            self.steps,
            self.gen.sampling.get("sampler", "euler"),
            self.cfg_scale,
            self.interval,  # type: ignore[arg-type]
            self.grad_steps,
        )
        tokenizer = self.gen.tokenizer
        latents = from_prior_space(self.gen.sampling, x)
        snapped = tokenizer.codes_to_latent(tokenizer.latent_to_codes(latents))
        surrogate = latents if self.temperature == 0 else self.soft_snap(latents)
        return tokenizer.decode_latent(surrogate + (snapped - surrogate).detach()), graded

    def soft_snap(self, latents: torch.Tensor) -> torch.Tensor:
        """sum_k softmax(-|latent - c_k|^2 / tau)_k c_k per cell: the snap's gradient as a
        choice among codes (towards codes that decode to more reward), where the identity's
        only says which way to move within a code's cell."""
        codes = self.codebook.to(latents.dtype)  # (K, D)
        flat = latents.permute(0, 2, 3, 1)  # (B, h, w, D)
        weights = (-torch.cdist(flat.flatten(0, 2), codes).pow(2) / self.tau).softmax(-1)
        return (weights @ codes).view(flat.shape).permute(0, 3, 1, 2)

    def drift(self, graded: list[OdeStep], labels: torch.Tensor) -> torch.Tensor:
        """sum over the graded steps of |d tau| * mean (derivative - prior's derivative)^2."""
        total = torch.zeros(())
        for step in graded:
            with torch.no_grad():
                ref = ode_derivative(
                    self.reference, self.form, step.x, step.t, labels, step.guidance
                )
            dtau = abs(self.form.ode_coords(step.s)[1] - self.form.ode_coords(step.t)[1])
            total = total + dtau * (step.derivative - ref).pow(2).mean()
        return total


def differentiable(fn: RewardFn, name: str, images: torch.Tensor, labels: torch.Tensor):
    """The reward with its graph to the images; refuses one that drops it."""
    out = fn(images, labels)
    if not isinstance(out, torch.Tensor) or not out.requires_grad:
        raise SystemExit(
            f"reward {name!r} is not differentiable in the images (it returned no graph: "
            "a .detach(), torch.no_grad or a non-torch computation); the reward gradient needs "
            "one that is, e.g. realism or bench.rl_user_rewards:log_clean_background"
        )
    return out.float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_pipeline_args(parser, "realism")
    parser.add_argument("--steps", type=int, default=100, help="optimiser steps")
    parser.add_argument("--group", type=int, default=8, help="samples per class per step")
    parser.add_argument("--grad-steps", type=int, default=5, help="ODE steps backpropagated")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument(
        "--soft-snap",
        type=float,
        default=0.0,
        help="backpropagate the snap to codes as a softmax over codes at this temperature (in "
        "mean squared nearest-code spacings); 0: as the identity (straight through)",
    )
    parser.add_argument("--beta", type=float, default=0.0, help="weight of the drift penalty")
    parser.add_argument("--grad-clip", type=float, default=1.0)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--per-class", type=int, default=100, help="eval samples per class")
    parser.add_argument("--interpolate", type=float, nargs="*", default=[])
    parser.add_argument("--grids", type=Path, default=None, help="before.png, after.png here")
    args = parser.parse_args()
    if args.steps < 1 or args.group < 1 or args.grad_steps < 1 or args.lr <= 0:
        parser.error("--steps, --group and --grad-steps must be >= 1 and --lr > 0")
    if args.beta < 0 or any(not 0 < a < 1 for a in args.interpolate):
        parser.error("--beta >= 0 and every --interpolate in (0, 1)")
    root = args.root
    params, cfg = reward_params(args)
    seed, knn = params.base.seed, params.evaluate.knn_k
    torch.manual_seed(seed)
    gen, judges, reward = load(root, params, cfg)
    net = gen.prior
    if not isinstance(net, Denoiser):
        raise SystemExit(f"prior kind {gen.kind!r}: the reward gradient needs a diffusion prior")
    reference = copy.deepcopy(net).eval().requires_grad_(False)
    sampler = ServedSampler(gen, reference, args.grad_steps, args.soft_snap)
    reward_fn = reward.fns[args.reward]
    num_classes = int(net.num_classes)
    with torch.no_grad():  # refuse a reward without a gradient before any work
        probe = gen.tokenizer.decode_codes(torch.zeros(1, *net.latent_shape[1:], dtype=torch.long))
    differentiable(reward_fn, args.reward, probe.requires_grad_(True), torch.zeros(1).long())
    test_x, _ = load_split("test", root / artifacts.PREPARED)

    def evaluate() -> dict[str, Any]:
        return measure(
            gen, judges["evaluator"], reward, test_x, args.per_class, seed, knn, args.reward
        )

    net.eval().requires_grad_(True)  # eval: no class dropout; the net samples as served
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=0.0)
    labels = torch.arange(num_classes).repeat_interleave(args.group)
    start = time.perf_counter()
    with cpu_threads(torch.device("cpu")):
        before = evaluate()
        report("before", before, before)
        after = before
        for step in range(args.steps):
            rng = torch.Generator().manual_seed(seed + STEP_SEED_OFFSET + step)
            images, graded = sampler.images(labels, rng)
            r = differentiable(reward_fn, args.reward, images, labels)
            drift = sampler.drift(graded, labels)
            loss = -r.mean() + args.beta * drift
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), args.grad_clip)
            opt.step()
            if (step + 1) % 10 == 0:
                batch = float(r.detach().mean())
                gain = (batch - before["reward_mean"]) / before["reward_std"]
                print(
                    f"step {step + 1}: batch reward {batch:.4f} ({gain:+.2f} std) "
                    f"drift {float(drift):.4f} t={time.perf_counter() - start:.0f}s",
                    flush=True,
                )
            if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
                with torch.no_grad():
                    after = evaluate()
                report(f"step {step + 1}", after, before)
        secs = time.perf_counter() - start
        settings = (
            f"{args.steps} steps x {args.group}/class, grad steps {args.grad_steps}, "
            f"lr {args.lr}, beta {args.beta}, soft snap {args.soft_snap}"
        )
        print(f"kind={gen.kind} reward={args.reward} {settings} secs={secs:.0f}")
        print_row(gen.kind, args.reward, settings, before, after, {})
        if args.grids is not None:
            save_grids(args.grids, before, after, args.per_class, num_classes)
        last = {k: v.clone() for k, v in net.state_dict().items()}
        for alpha in args.interpolate:
            net.load_state_dict(finetune.interpolate(reference.state_dict(), last, alpha))
            with torch.no_grad():
                m = evaluate()
            print_row(gen.kind, args.reward, f"{settings}, last A {alpha}", before, m, {})


if __name__ == "__main__":
    main()
