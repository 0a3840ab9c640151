"""Could any RL run meet the reward-gain bar? The ideal move of each reward, priced without RL.

KL-regularised RL at its optimum draws from the prior tilted by its reward,
p(x) exp(lam r(x)) (bench/rl_reward_gain.py). Reweighting a prior's pre-RL samples that way,
within each class as RL's groups do, prices the bar's move for any reward without training:
for the tilt that gains +2 pre-RL stds of the reward, its KL per sample, its effective
sample size, and the evaluator's class consistency and FID of the tilted distribution as
weighted statistics of the same samples (consistency: the weighted share of samples the
evaluator assigns to their class; FID: the Frechet distance of the weighted mean and
covariance of the evaluator features to the test split's), against the unweighted figures.

A weighted FID rests on fewer effective samples than the unweighted one and reads high for
that alone. The same weights dealt to the samples of each class in a random order (the reward
permuted within the class: same KL, same effective size, no link to the reward) measure that
inflation; the corrected FID subtracts it, and is what a fresh sample of the tilted prior as
large as the pre-RL one would read (the bar's FID ratio compares two such samples), give or
take the shuffles' spread (printed as ± sd: it grows as the effective size falls). FID falls
as N grows, so the corrected ratio is taken at the bar's 1,000 samples: the unweighted FID of
1,000-sample sets less that of all N samples is added to the tilt's. At 1,000 samples a 2-std
tilt leaves some 50 effective samples, too few to price it (sd about 0.4x); --per-class 500
or more (default 100 per class, as the bar's sample) narrows it.

Also printed: the ceiling, the mean over classes of the best sample's reward (no reweighting
of these samples gets past it; RL could, at a KL past log(samples per class)); the largest
gain, in steps of 0.25 std, whose corrected FID ratio and consistency stay within the bar
(FID at most 1.2x, consistency down at most 2 points); and the reward of the test images'
tokenizer reconstructions (what a prior over these codes can draw) in pre-RL stds. The
rewards: the built-ins, `class_confidence` uncapped (`confidence_cap: 1`), and the
user rewards of bench/rl_user_rewards.py.

  PYTHONPATH=src python bench/rl_tilt_headroom.py --root AR_ROOT --root DIFFUSION_ROOT
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import rl_user_rewards  # noqa: E402
from bench.rl_reward_gain import solve_tilt, tilt, tilt_weights  # noqa: E402
from genpipe import artifacts, evaluation, rewards  # noqa: E402
from genpipe.artifacts.generator import load_generator  # noqa: E402
from genpipe.artifacts.judges import load_judge  # noqa: E402
from genpipe.config import load_params  # noqa: E402
from genpipe.data.prepared import load_split  # noqa: E402
from genpipe.generator import Generator  # noqa: E402
from genpipe.stages import finetune  # noqa: E402

USER_REWARDS = (
    "clean_background",
    "log_clean_background",
    "ink",
    "thin",
    "upright",
    "centred",
    "size",
    "smooth",
    "crisp",
)
BUILTIN_REWARDS = ("class_confidence", "class_confidence_uncapped", "compressibility", "realism")
CHUNK = 100  # samples per class per sampling round
FID_BAR, CONSISTENCY_BAR = 1.2, 0.02  # the reward-gain bar's hacking check


@dataclass(frozen=True)
class Samples:
    """Pre-RL samples as the headroom needs them: labels, whether the evaluator assigns each
    to its class, evaluator features of the samples and of the test split, their unweighted
    FID, and the unweighted FID of a sample of the bar's size (FID falls as N grows, so the
    ratio is taken there, as the bar takes it)."""

    labels: torch.Tensor
    correct: torch.Tensor
    fake: torch.Tensor
    real: torch.Tensor
    fid: float
    fid_bar: float


def weighted_gaussian_stats(
    feats: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance (N, d) -> (d,), (d, d) of samples with weights summing to 1, the
    covariance divided by 1 - sum(w^2) (unbiased for such weights): equal weights give exactly
    evaluation.gaussian_stats, so a weighted FID is comparable to the unweighted one."""
    x, w = feats.double(), weights.double()
    if w.shape != (len(x),) or (w < 0).any() or not math.isclose(float(w.sum()), 1.0):
        raise ValueError(f"weights must be (N,) = ({len(x)},), >= 0 and sum to 1")
    mu = w @ x
    centred = x - mu
    cov = (centred * w[:, None]).t() @ centred / (1 - float(w.square().sum()))
    return mu, cov


def weighted_fid(real: torch.Tensor, fake: torch.Tensor, weights: torch.Tensor) -> float:
    """FID between real features and weighted fake features (the fake set tilted)."""
    return evaluation.frechet_distance(
        *evaluation.gaussian_stats(real), *weighted_gaussian_stats(fake, weights)
    )


def effective_size(weights: torch.Tensor) -> float:
    """Kish's effective sample size, 1 / sum(w^2) for weights summing to 1."""
    return float(1 / weights.double().square().sum())


def shuffle_within(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """An index permutation that moves every sample only among samples of its own label."""
    index = torch.arange(len(labels))
    for c in labels.unique():
        members = index[labels == c]
        index[members] = members[torch.randperm(len(members), generator=generator)]
    return index


def price(reward: torch.Tensor, s: Samples, gain: float, draws: int, seed: int) -> dict[str, float]:
    """The tilt that gains `gain` pre-RL stds: its KL, effective size, weighted consistency,
    FID raw, and FID corrected by `draws` reward-blind shuffles of the same weights (and
    their spread). Empty where no reweighting of these samples reaches the gain."""
    target = float(reward.mean()) + gain * float(reward.std())
    lam = solve_tilt(reward, s.labels, 0, target)
    if not math.isfinite(lam):
        return {}
    w = tilt_weights(reward, s.labels, lam)
    fid = weighted_fid(s.real, s.fake, w)
    g = torch.Generator().manual_seed(seed)
    blind = torch.tensor(
        [weighted_fid(s.real, s.fake, w[shuffle_within(s.labels, g)]) for _ in range(draws)]
    )
    return {
        "kl": tilt(reward, s.labels, lam)[1],
        "ess": effective_size(w),
        "consistency": float(w @ s.correct),
        "fid_ratio": fid / s.fid,
        # the tilt's FID at N samples, moved to the bar's sample size by the unweighted shift
        "fid_ratio_corrected": (fid - float(blind.mean()) + s.fid_bar) / s.fid_bar,
        "fid_ratio_sd": float(blind.std()) / s.fid_bar if draws > 1 else math.nan,
    }


def best_gain(reward: torch.Tensor, s: Samples, draws: int, seed: int) -> float:
    """The largest gain (0.25 std steps up to 3) whose tilt keeps the corrected FID ratio
    and the consistency within the bar, every smaller step too."""
    best = 0.0
    for step in range(1, 13):
        m = price(reward, s, step / 4, draws, seed)
        drop = float(s.correct.mean()) - m.get("consistency", 0.0)
        if not m or m["fid_ratio_corrected"] > FID_BAR or drop > CONSISTENCY_BAR:
            break
        best = step / 4
    return best


def candidates(
    ctx: rewards.RewardContext, only: list[str]
) -> dict[str, Callable[..., torch.Tensor]]:
    """Reward name -> reward function (images, labels) -> (B,), for the names in `only` (all
    if empty): `realism` draws its reference from the prior, so only when asked for."""
    uncapped = rewards.RewardContext(ctx.judge, 1.0)
    builders: dict[str, Callable[[], Callable[..., torch.Tensor]]] = {
        "class_confidence": lambda: rewards.class_confidence(ctx),
        "class_confidence_uncapped": lambda: rewards.class_confidence(uncapped),
        "compressibility": lambda: rewards.compressibility,
        "realism": lambda: rewards.realism(ctx),
    }
    builders.update(
        {name: lambda name=name: getattr(rl_user_rewards, name) for name in USER_REWARDS}
    )
    return {name: build() for name, build in builders.items() if not only or name in only}


def draw(
    gen: Generator, per_class: int, num_classes: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples as bench/rl_reward_gain.py draws them (its first CHUNK per class are the same
    ones), in rounds of CHUNK per class with seeds seed, seed + 1, ...: memory stays bounded
    however many a tight price needs."""
    images, labels = [], []
    for i, start in enumerate(range(0, per_class, CHUNK)):
        n = min(CHUNK, per_class - start)
        x, y, _ = evaluation.generate(gen, n, num_classes, seed + i)
        images.append(x)
        labels.append(y)
    return torch.cat(images), torch.cat(labels)


def report(
    root: Path, per_class: int, gain: float, draws: int, only: list[str], realism_k: int | None
) -> None:
    """Print the headroom table of one pipeline's prior (ROOT as bench/rl_reward_gain.py)."""
    params = load_params(root / "params.yaml")
    seed = params.base.seed
    gen = load_generator(root / artifacts.TOKENIZER_FILE, root / artifacts.PRIOR / "prior.pt")
    gen = gen.requires_grad_(False)
    num_classes = int(gen.prior.num_classes)  # type: ignore[arg-type]
    judges = {role: load_judge(root, role, num_classes) for role in artifacts.JUDGE_ROLES}
    images, labels = draw(gen, per_class, num_classes, seed)
    test_x, test_y = load_split("test", root / artifacts.PREPARED)
    with torch.no_grad():
        recon = gen.tokenizer.decode_codes(gen.tokenizer.encode_codes(test_x))
    extractor = evaluation.FeatureExtractor(judges["evaluator"])
    fake = evaluation.features(extractor, images.clamp(0, 1)).double()
    real = evaluation.features(extractor, test_x.clamp(0, 1)).double()
    correct = (evaluation.predictions(judges["evaluator"], images) == labels).double()
    uniform = torch.full((len(labels),), 1 / len(labels), dtype=torch.float64)
    bar_n = min(CHUNK, per_class) * num_classes  # the reward-gain bench: 100 per class
    sets = [fake[i : i + bar_n] for i in range(0, len(fake) - bar_n + 1, bar_n)]
    fid_bar = sum(evaluation.fid_from_features(real, f) for f in sets) / len(sets)
    s = Samples(labels, correct, fake, real, weighted_fid(real, fake, uniform), fid_bar)
    cons0 = float(correct.mean())
    print(
        f"{gen.kind} ({root}): {len(labels)} samples, consistency {cons0:.3f}, FID {s.fid:.3f}, "
        f"{s.fid_bar:.3f} at {bar_n} (KL: nats per sample; ESS: effective sample size; FID "
        f"ratio: tilted / unweighted, raw at {len(labels)}, corrected at {bar_n})"
    )
    print(
        f"| kind | reward | pre mean ± std | recon (stds) | ceiling (stds) | KL for +{gain:g} | "
        "ESS | consistency | FID ratio raw | FID ratio corrected ± sd | best gain within bar |"
    )
    cfg = params.finetune
    if realism_k is not None:
        cfg = cfg.model_copy(update={"realism_k": realism_k})
    ctx = finetune.reward_context(gen, judges["reward"], cfg, seed, root)
    for name, fn in candidates(ctx, only).items():
        r = fn(images, labels).double()
        mean, std = float(r.mean()), float(r.std())
        if std == 0:
            print(f"| {gen.kind} | {name} | {mean:.4g} ± 0 | constant: no tilt moves it |")
            continue
        recon_gap = (float(fn(recon, test_y).double().mean()) - mean) / std
        top = sum(float(r[labels == c].max()) for c in labels.unique()) / num_classes
        row = price(r, s, gain, draws, seed)
        tail = (
            f"{row['kl']:.2f} | {row['ess']:.0f} | {cons0:.3f} -> {row['consistency']:.3f} | "
            f"{row['fid_ratio']:.2f}x | {row['fid_ratio_corrected']:.2f}x "
            f"± {row['fid_ratio_sd']:.2f}"
            if row
            else "beyond the ceiling | | | |"
        )
        print(
            f"| {gen.kind} | {name} | {mean:.4g} ± {std:.3g} | {recon_gap:+.2f} | "
            f"{(top - mean) / std:+.2f} | {tail} | +{best_gain(r, s, draws, seed):.2f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, action="append", required=True, help="repeatable")
    parser.add_argument("--per-class", type=int, default=100, help="pre-RL samples per class")
    parser.add_argument("--draws", type=int, default=16, help="reward-blind shuffles per FID")
    parser.add_argument("--gain", type=float, default=2.0, help="the bar, in pre-RL stds")
    parser.add_argument("--reward", action="append", default=[], help="only these (repeatable)")
    parser.add_argument("--realism-k", type=int, default=None, help="default: finetune's")
    args = parser.parse_args()
    if unknown := sorted(set(args.reward) - {*BUILTIN_REWARDS, *USER_REWARDS}):
        parser.error(f"--reward {unknown}: choose from {[*BUILTIN_REWARDS, *USER_REWARDS]}")
    for root in args.root:
        report(root, args.per_class, args.gain, args.draws, args.reward, args.realism_k)


if __name__ == "__main__":
    main()
