"""Does GRPO move a reward that is not saturated, and at what cost?

Runs `finetune.train` on a pipeline's prior (models/prior, models/tokenizer, models/judges
under --root, where the digits pipeline ran) against one reward, by default
`compressibility` alone (or a user reward: --reward clean_background --entry-point
bench.rl_user_rewards:clean_background): class_confidence sits at its cap for a strong
prior, so every advantage is 0 and it cannot show learning. Before and after, it samples
as the prior file says (as evaluation and serving do) and prints:
  - the reward's mean and per-sample std (the bar: after - before >= 2 pre-RL stds),
  - the KL per sample to the prior at the kept step (averaged over the rail window),
  - the evaluator's class consistency (bar: down at most 2 points) and FID against the test
    split (bar: at most 1.2x), the reward-hacking check by a judge RL never sees.
Any other finetune param comes from --params; e.g. for the diffusion prior, train one in a
second root with prior.kind: diffusion and point --root there.

  PYTHONPATH=src python bench/rl_reward_gain.py --root . --steps 60
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from genpipe import artifacts, evaluation  # noqa: E402
from genpipe.artifacts.generator import load_generator  # noqa: E402
from genpipe.artifacts.judges import load_judge  # noqa: E402
from genpipe.config import Finetune, load_params, read_params_yaml  # noqa: E402
from genpipe.data.prepared import load_split  # noqa: E402
from genpipe.generator import Generator  # noqa: E402
from genpipe.rewards import RewardContext, WeightedReward, build_reward  # noqa: E402
from genpipe.runtime import cpu_threads  # noqa: E402
from genpipe.stages import finetune  # noqa: E402


def measure(
    gen: Generator,
    evaluator: torch.nn.Module,
    reward: WeightedReward,
    test_x: torch.Tensor,
    per_class: int,
    seed: int,
) -> dict[str, float]:
    images, labels, _ = evaluation.generate(gen, per_class, int(gen.prior.num_classes), seed)
    total, _ = reward(images, labels)
    return {
        "reward_mean": float(total.mean()),
        "reward_std": float(total.std()),
        "consistency": evaluation.class_consistency(evaluator, images, labels),
        "fid": evaluation.fid(evaluation.FeatureExtractor(evaluator), test_x, images),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("."))
    parser.add_argument("--params", type=Path, default=None, help="default: ROOT/params.yaml")
    parser.add_argument("--reward", default="compressibility")
    parser.add_argument(
        "--entry-point",
        default=None,
        help='module:function for --reward, e.g. "bench.rl_user_rewards:clean_background"',
    )
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="another finetune param, e.g. --set advantage=dr_grpo --set beta=0.2 (YAML value)",
    )
    parser.add_argument("--per-class", type=int, default=100, help="eval samples per class")
    args = parser.parse_args()
    root = args.root
    params = load_params(args.params or root / "params.yaml")
    overrides = {"steps": args.steps, "rewards": {args.reward: 1.0}}
    if args.entry_point is not None:
        overrides["reward_entry_points"] = {args.reward: args.entry_point}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = read_params_yaml(value)
    # validated as params.yaml would be: a wrong key or value stops here, before any work
    cfg = Finetune.model_validate({**params.finetune.model_dump(), **overrides})
    torch.manual_seed(params.base.seed)

    gen = load_generator(root / artifacts.TOKENIZER_FILE, root / artifacts.PRIOR / "prior.pt")
    gen = gen.requires_grad_(False)
    num_classes = int(gen.prior.num_classes)  # type: ignore[arg-type]
    judges = {role: load_judge(root, role, num_classes) for role in artifacts.JUDGE_ROLES}
    context = RewardContext(judges["reward"], cfg.confidence_cap)
    project = Path(__file__).resolve().parents[1]  # where bench.rl_user_rewards imports from
    reward = build_reward(cfg.rewards, cfg.reward_entry_points, context, project)
    test_x, _ = load_split("test", root / artifacts.PREPARED)
    seed = params.base.seed

    before = measure(gen, judges["evaluator"], reward, test_x, args.per_class, seed)
    gen.prior.requires_grad_(True)
    policy, _ = finetune.make_policy(gen, cfg)
    start = time.perf_counter()
    with cpu_threads(torch.device("cpu")):  # as the stage: small batches, one thread
        result = finetune.train(
            policy, reward, cfg, num_classes, torch.Generator().manual_seed(seed)
        )
    secs = time.perf_counter() - start
    policy.net.load_state_dict(result.best["state"])
    policy.net.eval()
    after = measure(gen, judges["evaluator"], reward, test_x, args.per_class, seed)

    gain = (after["reward_mean"] - before["reward_mean"]) / before["reward_std"]
    drop = 100 * (before["consistency"] - after["consistency"])
    fid_ratio = after["fid"] / before["fid"]
    kind = gen.kind
    print(
        f"kind={kind} reward={args.reward} advantage={cfg.advantage} "
        f"adv_std_floor={cfg.adv_std_floor} kl_estimator={cfg.kl_estimator} beta={cfg.beta} "
        f"lr={cfg.lr} steps_run={result.steps_run} "
        f"best_step={result.best['step']} stopped_early={result.stopped_early} train_s={secs:.0f}"
    )
    print(f"{'':<14}{'reward':>10}{'reward std':>12}{'consistency':>13}{'FID':>9}")
    for name, m in (("before", before), ("after", after)):
        print(
            f"{name:<14}{m['reward_mean']:>10.4f}{m['reward_std']:>12.4f}"
            f"{m['consistency']:>13.3f}{m['fid']:>9.3f}"
        )
    print(
        f"reward gain {gain:+.2f} pre-RL stds (bar >= 2) | KL at the kept step "
        f"{result.best['kl']:.3f} nats/sample | consistency {-drop:+.1f} points (bar >= -2) | "
        f"FID x{fid_ratio:.2f} (bar <= 1.2)"
    )
    ok = gain >= 2 and drop <= 2 and fid_ratio <= 1.2
    print("PASS" if ok else "FAIL")


if __name__ == "__main__":
    main()
