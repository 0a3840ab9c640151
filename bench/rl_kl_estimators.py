"""Noise of the two KL estimators of `ar` RL, on one policy that RL has moved.

Takes the pipeline's ar prior (--root), moves a copy of it by a few GRPO steps against
`compressibility` (so policy != prior), then draws --rollouts samples and prints the mean and
std of the KL per sample two ways: the whole-sequence k3 estimate at the sampled codes
(`finetune.kl_estimator: k3`) and the exact per-code KL summed over the grid (`exact`).
Both estimate the same quantity, so the means should agree; the std is the noise the
penalty and the kl_bound rail see.

  PYTHONPATH=src python bench/rl_kl_estimators.py --root .
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from genpipe import artifacts, rl  # noqa: E402
from genpipe.artifacts.generator import load_generator  # noqa: E402
from genpipe.artifacts.judges import load_judge  # noqa: E402
from genpipe.config import load_params  # noqa: E402
from genpipe.rewards import RewardContext, build_reward  # noqa: E402
from genpipe.runtime import cpu_threads  # noqa: E402
from genpipe.stages import finetune  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("."))
    parser.add_argument("--steps", type=int, default=30, help="GRPO steps that move the policy")
    parser.add_argument("--rollouts", type=int, default=120)
    args = parser.parse_args()
    params = load_params(args.root / "params.yaml")
    cfg = params.finetune.model_copy(
        update={"steps": args.steps, "rewards": {"compressibility": 1.0}, "kl_estimator": "exact"}
    )
    gen = load_generator(
        args.root / artifacts.TOKENIZER_FILE, args.root / artifacts.PRIOR / "prior.pt"
    ).requires_grad_(False)
    num_classes = int(gen.prior.num_classes)  # type: ignore[arg-type]
    context = RewardContext(load_judge(args.root, "reward", num_classes), cfg.confidence_cap)
    reward = build_reward(cfg.rewards, {}, context)
    gen.prior.requires_grad_(True)
    policy, _ = finetune.make_policy(gen, cfg)
    rng = torch.Generator().manual_seed(params.base.seed)
    with cpu_threads(torch.device("cpu")):
        finetune.train(policy, reward, cfg, num_classes, rng)
        labels = torch.arange(args.rollouts) % num_classes
        roll = policy.rollout(labels, rng)
    k3 = rl.kl_k3(roll.old_logp, roll.ref_logp).sum(dim=1)
    exact = roll.exact_kl
    assert exact is not None
    print(f"{args.rollouts} rollouts after {args.steps} GRPO steps (compressibility)")
    print(f"{'estimator':<12}{'mean':>8}{'std':>8}{'max':>8}")
    for name, kl in (("k3", k3), ("exact", exact)):
        print(f"{name:<12}{kl.mean():>8.3f}{kl.std():>8.3f}{kl.max():>8.3f}")


if __name__ == "__main__":
    main()
