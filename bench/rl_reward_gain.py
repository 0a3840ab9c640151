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
    split (bar: at most 1.2x), the reward-hacking check by a judge RL never sees, with its
    precision and recall (evaluate.knn_k) to tell a collapse from a spread;
  - with --grids DIR, before.png and after.png: 16 samples of each class, to look at;
  - with --curve-every N, while RL runs, every N steps: the window-mean reward in pre-RL stds
    and the KL beyond step 0, against the ideal gain at that KL (whether RL's gain per nat
    approaches the ideal's as it trains longer), also written to --curve CSV if given.
Two references say how far the reward could go: its mean on the real test images and on
their tokenizer reconstructions (what the prior can reach at best), and the ideal gain at the
KL spent: the per-class exponential tilt of the pre-RL samples, p(x) exp(lam r(x)), which
has the highest mean reward of any reweighting with that KL (the optimum of KL-regularised
RL); with the KL that tilt needs for the 2-std bar. Any other finetune param comes from
--params or --set; e.g. for the diffusion prior, train one in a second root with
prior.kind: diffusion and point --root there.

  PYTHONPATH=src python bench/rl_reward_gain.py --root . --steps 60
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from genpipe import artifacts, curves, evaluation, viz  # noqa: E402
from genpipe.artifacts.generator import load_generator  # noqa: E402
from genpipe.artifacts.judges import load_judge  # noqa: E402
from genpipe.config import Finetune, Params, load_params, read_params_yaml  # noqa: E402
from genpipe.data.prepared import load_split  # noqa: E402
from genpipe.evaluation_intervals import fid_ratio_interval  # noqa: E402
from genpipe.generator import Generator  # noqa: E402
from genpipe.rewards import WeightedReward, build_reward  # noqa: E402
from genpipe.rl import Policy  # noqa: E402
from genpipe.runtime import cpu_threads  # noqa: E402
from genpipe.stages import finetune  # noqa: E402


def measure(
    gen: Generator,
    evaluator: torch.nn.Module,
    reward: WeightedReward,
    test_x: torch.Tensor,
    per_class: int,
    seed: int,
    knn_k: int,
    name: str,
) -> dict[str, Any]:
    """Samples as the prior file says, scored by the reward `name` (one term of `reward`) and
    by the evaluator."""
    images, labels, _ = evaluation.generate(gen, per_class, int(gen.prior.num_classes), seed)
    _, parts = reward(images, labels)
    total = parts[name]
    extractor = evaluation.FeatureExtractor(evaluator)
    real_f, fake_f = (evaluation.features(extractor, x.clamp(0, 1)) for x in (test_x, images))
    return {
        "images": images,
        **evaluation.precision_recall(real_f, fake_f, knn_k, seed),
        "rewards": total,
        "labels": labels,
        "reward_mean": float(total.mean()),
        "reward_std": float(total.std()),
        "consistency": evaluation.class_consistency(evaluator, images, labels),
        "fid": evaluation.fid_from_features(real_f, fake_f),
        "real_features": real_f,
        "features": fake_f,
    }


def _class_tilts(
    rewards: torch.Tensor, labels: torch.Tensor, lam: float
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(mask, weights within the class) per class: the class's samples reweighted by
    exp(lam * reward), summing to 1."""
    for c in labels.unique():
        mask = labels == c
        yield mask, torch.softmax(lam * rewards[mask].double(), 0)


def tilt_weights(rewards: torch.Tensor, labels: torch.Tensor, lam: float) -> torch.Tensor:
    """Weights (N,), summing to 1, of the samples reweighted by exp(lam * reward) within each
    class, every class keeping an equal share (RL's groups never trade one for another)."""
    w = torch.zeros(len(rewards), dtype=torch.float64)
    tilts = list(_class_tilts(rewards, labels, lam))
    for mask, wc in tilts:
        w[mask] = wc / len(tilts)
    return w


def tilt(rewards: torch.Tensor, labels: torch.Tensor, lam: float) -> tuple[float, float]:
    """(mean reward, KL to the samples) of the per-class tilt `tilt_weights(..., lam)`; the KL
    is the mean over classes of each class's KL to its equally weighted samples (a weight of
    0 adds 0)."""
    mean = kl = 0.0
    tilts = list(_class_tilts(rewards, labels, lam))
    for mask, w in tilts:
        mean += float(w @ rewards[mask].double()) / len(tilts)
        kl += float(torch.special.xlogy(w, w * len(w)).sum()) / len(tilts)
    return mean, kl


def solve_tilt(rewards: torch.Tensor, labels: torch.Tensor, key: int, target: float) -> float:
    """The tilt lam >= 0 at which tilt(...)[key] reaches target (bisection; both grow with
    lam); inf where no reweighting of these samples reaches it."""
    if tilt(rewards, labels, 1e4)[key] < target:
        return math.inf
    lo, hi = 0.0, 1e4
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if tilt(rewards, labels, mid)[key] < target else (lo, mid)
    return hi


def ideal(rewards: torch.Tensor, labels: torch.Tensor, kl: float) -> tuple[float, float]:
    """(gain in stds of the best tilt at this KL, KL the best tilt needs for 2 stds)."""
    mean, std = float(rewards.mean()), float(rewards.std())
    lam = solve_tilt(rewards, labels, 1, max(kl, 0.0))
    gain = (tilt(rewards, labels, min(lam, 1e4))[0] - mean) / std
    lam2 = solve_tilt(rewards, labels, 0, mean + 2 * std)
    return gain, tilt(rewards, labels, lam2)[1] if math.isfinite(lam2) else math.inf


@dataclass(frozen=True)
class BarCheck:
    """Issue 12's bar for RL against a reward, from before/after `measure`s: the reward up at
    least 2 pre-RL per-sample stds, the evaluator's consistency down at most 2 points, its FID
    at most 1.2x."""

    gain: float  # pre-RL stds
    drop: float  # consistency points lost
    fid_ratio: float

    @classmethod
    def of(cls, before: dict[str, Any], after: dict[str, Any]) -> BarCheck:
        return cls(
            (after["reward_mean"] - before["reward_mean"]) / before["reward_std"],
            100 * (before["consistency"] - after["consistency"]),
            after["fid"] / before["fid"],
        )

    @property
    def passed(self) -> bool:
        return self.gain >= 2 and self.drop <= 2 and self.fid_ratio <= 1.2


def gain_standard_error(before: dict[str, Any], after: dict[str, Any]) -> float:
    """Standard error of the bar's gain, in pre-RL stds (that std taken as known): of the
    difference of two means of equal N."""
    n = len(before["rewards"])
    se = math.sqrt((before["reward_std"] ** 2 + after["reward_std"] ** 2) / n)
    return se / before["reward_std"]


def bar_intervals(
    before: dict[str, Any], after: dict[str, Any], resamples: int = 200, seed: int = 0
) -> dict[str, tuple[float, float]]:
    """95% intervals of the bar's gain and FID ratio, from before/after `measure`s of equal N:
    the gain's from `gain_standard_error`; the FID ratio's, FID(test, after) / FID(test,
    before), by the re-centred bootstrap of genpipe.evaluation_intervals, which resamples all
    three sets (the test split the same in both FIDs)."""
    gain = (after["reward_mean"] - before["reward_mean"]) / before["reward_std"]
    half = 1.96 * gain_standard_error(before, after)
    fid = fid_ratio_interval(
        before["real_features"], after["features"], before["features"], resamples, 0.95, seed
    )
    return {"gain": (gain - half, gain + half), "fid_ratio": (fid.low, fid.high)}


def print_row(
    kind: str,
    reward: str,
    settings: str,
    before: dict[str, Any],
    after: dict[str, Any],
    method: dict[str, str],
) -> None:
    """The README RL table's header and row for one run, with the method's own columns
    (`method`: header -> cell, e.g. the KL) between the gain and the hacking check; then PASS
    or FAIL against the bar."""
    bar = BarCheck.of(before, after)
    print(
        "| kind | reward | settings | pre mean ± std | post mean | gain (stds) | "
        + "".join(f"{h} | " for h in method)
        + "consistency | FID ratio | precision | recall |"
    )
    print(
        f"| {kind} | {reward} | {settings} | "
        f"{before['reward_mean']:.4f} ± {before['reward_std']:.4f} | {after['reward_mean']:.4f} | "
        f"{bar.gain:+.2f} | "
        + "".join(f"{v} | " for v in method.values())
        + f"{before['consistency']:.3f} -> {after['consistency']:.3f} | {bar.fid_ratio:.2f}x | "
        f"{before['precision']:.2f} -> {after['precision']:.2f} | "
        f"{before['recall']:.2f} -> {after['recall']:.2f} |"
    )
    print("PASS" if bar.passed else "FAIL")
    intervals = bar_intervals(before, after)
    print(
        "95% intervals: gain [{:+.2f}, {:+.2f}] stds, FID ratio [{:.2f}, {:.2f}]x".format(
            *intervals["gain"], *intervals["fid_ratio"]
        )
    )


MIN_IDEAL = 0.05  # stds: below this the ideal gain is ~0 and RL's share of it is noise


def curve_point(
    recent: list[dict[str, float]],
    name: str,
    kl0: float,
    rewards: torch.Tensor,
    labels: torch.Tensor,
) -> dict[str, float]:
    """One point of the gain-vs-KL curve from the last training rows `recent` (the rail
    window, as the kept step is picked): the reward term `name`'s mean over them in pre-RL
    stds above the pre-RL samples' mean (`rewards`, `labels`: the bench's `before`), their
    mean KL beyond step 0's `kl0`, the ideal tilt's gain at that KL and RL's share of it.
    Under RL's own sampler: the served one for ar, not for diffusion."""
    kl = sum(r["kl"] for r in recent) / len(recent) - kl0
    mean = sum(r[f"reward_{name}"] for r in recent) / len(recent)
    gain = (mean - float(rewards.mean())) / float(rewards.std())
    ideal_gain = ideal(rewards, labels, kl)[0]
    share = gain / ideal_gain if ideal_gain > MIN_IDEAL else math.nan  # not at KL ~0
    step = recent[-1]["step"]
    return {"step": step, "gain": gain, "kl": kl, "ideal_gain": ideal_gain, "share": share}


def curve_printer(
    every: int,
    window: int,
    name: str,
    rewards: torch.Tensor,
    labels: torch.Tensor,
    out: Path | None,
) -> curves.Sink:
    """A sink for finetune.train's rows that prints (and appends to `out`, a CSV) a
    `curve_point` over the last `window` rows every `every` steps, the KL at step 0 read
    from the first row."""
    rows: list[dict[str, float]] = []

    def sink(row: dict[str, float]) -> None:
        rows.append(row)
        if row["step"] % every:
            return
        point = curve_point(rows[-window:], name, rows[0]["kl"], rewards, labels)
        print(
            f"curve step {point['step']:>5.0f}: gain {point['gain']:+.2f} stds at KL "
            f"{point['kl']:.2f} beyond step 0; ideal {point['ideal_gain']:+.2f} "
            f"(share {point['share']:.0%})",
            flush=True,
        )
        if out is not None:
            new = not out.exists()
            with out.open("a") as f:
                if new:
                    f.write(",".join(point) + "\n")
                f.write(",".join(f"{v:.6g}" for v in point.values()) + "\n")

    return sink


def add_pipeline_args(parser: argparse.ArgumentParser, reward: str) -> None:
    """--root, --params, --reward (default `reward`) and --entry-point: the pipeline an RL
    bench reads and the reward it reads the bar on."""
    parser.add_argument("--root", type=Path, default=Path("."))
    parser.add_argument("--params", type=Path, default=None, help="default: ROOT/params.yaml")
    parser.add_argument("--reward", default=reward)
    parser.add_argument(
        "--entry-point",
        default=None,
        help='module:function for --reward, e.g. "bench.rl_user_rewards:log_clean_background"',
    )


def reward_params(args: argparse.Namespace, **overrides: Any) -> tuple[Params, Finetune]:
    """(params of ROOT or --params, their finetune section with the reward --reward alone,
    --entry-point's module, and `overrides`), validated as params.yaml would be: a wrong key
    or value stops here, before any work."""
    params = load_params(args.params or args.root / "params.yaml")
    rewards = {args.reward: 1.0, **overrides.pop("rewards", {})}
    update: dict[str, Any] = {"rewards": rewards, **overrides}
    if args.entry_point is not None:
        update["reward_entry_points"] = {args.reward: args.entry_point}
    return params, Finetune.model_validate({**params.finetune.model_dump(), **update})


def load(
    root: Path, params: Params, cfg: Finetune
) -> tuple[Generator, dict[str, torch.nn.Module], WeightedReward]:
    """The pipeline under `root`: its generator (frozen), its judges by role and the reward
    `cfg.rewards` names, built as the finetune stage builds it."""
    gen = load_generator(root / artifacts.TOKENIZER_FILE, root / artifacts.PRIOR / "prior.pt")
    gen = gen.requires_grad_(False)
    num_classes = int(gen.prior.num_classes)  # type: ignore[arg-type]
    judges = {role: load_judge(root, role, num_classes) for role in artifacts.JUDGE_ROLES}
    context = finetune.reward_context(gen, judges["reward"], cfg, params.base.seed, root)
    project = Path(__file__).resolve().parents[1]  # where bench.rl_user_rewards imports from
    return gen, judges, build_reward(cfg.rewards, cfg.reward_entry_points, context, project)


def save_grids(
    folder: Path,
    before: dict[str, Any],
    after: dict[str, Any],
    per_class: int,
    classes: int,
    after_name: str = "after",
) -> None:
    """before.png and <after_name>.png: 16 of `measure`'s samples per class, a row per class."""
    for name, m in (("before", before), (after_name, after)):
        grid = viz.class_grid(m["images"], per_class, classes, show=16)
        viz.save_png(grid, folder / f"{name}.png")


def train_and_report(
    args: argparse.Namespace,
    cfg: Finetune,
    policy: Policy,
    reward: WeightedReward,
    before: dict[str, Any],
    measure_policy: Callable[[], dict[str, Any]],
    references: tuple[torch.Tensor, torch.Tensor],
    kind: str,
    settings: str,
    rl_seed: int,
) -> dict[str, torch.Tensor]:
    """GRPO from the prior as the stage runs it (one thread, rollouts seeded `rl_seed`), then
    the bar's row, the references (`references`: the reward of the real test images and of
    their reconstructions) against the ideal tilt at RL's KL, and the reward under the RL
    sampler, printed. Returns the weights the stage keeps (the EMA's with `ema`)."""
    num_classes = int(policy.net.num_classes)  # type: ignore[arg-type]
    start = time.perf_counter()
    curve = contextlib.nullcontext()
    if args.curve_every:
        sink = curve_printer(
            args.curve_every,
            cfg.rail_window,
            args.reward,
            before["rewards"],
            before["labels"],
            args.curve,
        )
        curve = curves.to(sink)
    with cpu_threads(torch.device("cpu")), curve:  # as the stage: small batches, one thread
        result = finetune.train(
            policy, reward, cfg, num_classes, torch.Generator().manual_seed(rl_seed)
        )
    secs = time.perf_counter() - start
    policy.net.load_state_dict(result.best["state"])
    after = measure_policy()

    # ar's KL is to the untruncated prior and starts at the truncation's cost; the tilt
    # reweights the truncated samples, so it gets the KL RL spent beyond that start
    kl0 = result.history[0]["kl"]
    bar = BarCheck.of(before, after)
    gain, drop, fid_ratio = bar.gain, bar.drop, bar.fid_ratio
    gain_se = gain / gain_standard_error(before, after)  # the gain in standard errors
    ideal_gain, ideal_kl = ideal(before["rewards"], before["labels"], result.best["kl"] - kl0)
    print(
        f"kind={kind} reward={args.reward} advantage={cfg.advantage} "
        f"adv_std_floor={cfg.adv_std_floor} kl_estimator={cfg.kl_estimator} beta={cfg.beta} "
        f"lr={cfg.lr} steps_run={result.steps_run} "
        f"best_step={result.best['step']} stopped_early={result.stopped_early} "
        f"train_s={secs:.0f}"
    )
    header = ("reward", "reward std", "consistency", "FID", "precision", "recall")
    print(f"{'':<14}" + "".join(f"{h:>12}" for h in header))
    for name, m in (("before", before), ("after", after)):
        print(
            f"{name:<14}{m['reward_mean']:>12.4f}{m['reward_std']:>12.4f}{m['consistency']:>12.3f}"
            f"{m['fid']:>12.3f}{m['precision']:>12.3f}{m['recall']:>12.3f}"
        )
    if args.grids is not None:
        save_grids(args.grids, before, after, args.per_class, num_classes)
    print(
        f"reward gain {gain:+.2f} pre-RL stds (bar >= 2) | KL at the kept step "
        f"{result.best['kl']:.3f} nats/sample | consistency {-drop:+.1f} points (bar >= -2) | "
        f"FID x{fid_ratio:.2f} (bar <= 1.2)"
    )
    real_mean, recon_mean = (float(r.mean()) for r in references)
    real_gap, recon_gap = (
        (m - before["reward_mean"]) / before["reward_std"] for m in (real_mean, recon_mean)
    )
    print(
        f"references: real test {real_mean:.4f} ({real_gap:+.2f} stds), its reconstructions "
        f"{recon_mean:.4f} ({recon_gap:+.2f} stds); ideal tilt of "
        f"the pre-RL samples: {ideal_gain:+.2f} stds at this KL less the KL at step 0, "
        f"2 stds at KL {ideal_kl:.2f}"
    )
    first, kept = result.history[0]["reward_mean"], result.best["reward"]
    print(
        f"under the RL sampler (all of RL's rewards): reward {first:.4f} at step 0, "
        f"{kept:.4f} at the kept step "
        f"(window mean), {(kept - first) / before['reward_std']:+.2f} pre-RL stds; "
        f"KL at step 0 {kl0:.3f} (ar: the cost of top-k/top-p truncation)"
    )
    method = {
        "gain (SEs)": f"{gain_se:+.1f}",
        "KL": f"{result.best['kl']:.2f}",
        "ideal gain at KL": f"{ideal_gain:+.2f}",
    }
    print_row(kind, args.reward, settings, before, after, method)
    if cfg.ema == 0:
        return result.best["state"]
    # what the stage keeps: the EMA's weights at the same step
    policy.net.load_state_dict(result.best["ema_state"])
    on_ema = measure_policy()
    print_row(kind, args.reward, f"{settings} EMA", before, on_ema, {})
    if args.grids is not None:
        save_grids(args.grids, before, on_ema, args.per_class, num_classes, "after_ema")
    return result.best["ema_state"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_pipeline_args(parser, "compressibility")
    parser.add_argument(
        "--with",
        dest="with_",
        action="append",
        default=[],
        metavar="NAME=WEIGHT",
        help="another built-in reward RL also optimises (the bar stays on --reward alone)",
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
    parser.add_argument(
        "--grids", type=Path, default=None, help="write before.png and after.png sample grids here"
    )
    parser.add_argument(
        "--curve-every",
        type=int,
        default=0,
        help="print RL's gain against the ideal at its KL every N steps (0: never)",
    )
    parser.add_argument("--curve", type=Path, default=None, help="also append that curve here")
    parser.add_argument(
        "--rl-seed",
        type=int,
        default=None,
        help="seed of RL's rollouts only (default base.seed); evaluation keeps base.seed",
    )
    parser.add_argument(
        "--interpolate",
        type=float,
        nargs="*",
        default=[],
        metavar="ALPHA",
        help="also measure the weights base + ALPHA x (kept - base), 0 < ALPHA < 1: the line "
        "from the prior to RL's weights (WiSE-FT / WARP's LITI), a row each; with --set "
        "ema=D, kept is the EMA's weights (printed first as its own row)",
    )
    parser.add_argument(
        "--save-kept",
        type=Path,
        default=None,
        help="save the kept weights (the EMA's with --set ema=D) here, for --kept",
    )
    parser.add_argument(
        "--kept",
        type=Path,
        nargs="+",
        default=None,
        metavar="FILE",
        help="no RL: measure these saved kept weights (--save-kept) and their --interpolate "
        "line; several files (runs with other --rl-seed) are averaged first, as "
        "finetune.policies averages its runs",
    )
    args = parser.parse_args()
    for path in args.kept or []:
        if not path.is_file():
            parser.error(f"--kept {path}: no such file; write one with --save-kept")
    if any(not 0 < a < 1 for a in args.interpolate):
        parser.error("--interpolate takes values strictly between 0 and 1")
    root = args.root
    extra = {k: float(v) for k, _, v in (item.partition("=") for item in args.with_)}
    overrides: dict[str, Any] = {"steps": args.steps, "rewards": extra}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = read_params_yaml(value)
    params, cfg = reward_params(args, **overrides)
    if cfg.policies > 1 and args.kept is None:
        parser.error(
            f"policies={cfg.policies}: this bench trains one policy a run; run it once per "
            "--rl-seed with --save-kept FILE, then measure their average with --kept FILE ..."
        )
    rl_seed = params.base.seed if args.rl_seed is None else args.rl_seed
    torch.manual_seed(rl_seed)

    gen, judges, reward = load(root, params, cfg)
    num_classes = int(gen.prior.num_classes)  # type: ignore[arg-type]
    test_x, test_y = load_split("test", root / artifacts.PREPARED)
    seed, knn = params.base.seed, params.evaluate.knn_k
    with torch.no_grad():
        recon = gen.tokenizer.decode_codes(gen.tokenizer.encode_codes(test_x))
    real, real_recon = (reward(x, test_y)[1][args.reward] for x in (test_x, recon))

    before = measure(
        gen, judges["evaluator"], reward, test_x, args.per_class, seed, knn, args.reward
    )
    gen.prior.requires_grad_(True)
    policy, reference = finetune.make_policy(gen, cfg)  # reference: the prior's weights, frozen
    settings = " ".join([*args.set, *(f"with {w}" for w in args.with_)]) or "defaults"
    kind = gen.kind

    def measure_policy() -> dict[str, Any]:
        policy.net.eval()
        return measure(
            gen, judges["evaluator"], reward, test_x, args.per_class, seed, knn, args.reward
        )

    if args.kept is not None:  # a saved run's kept weights: no training, the line only
        kept_state = finetune.average([torch.load(f, weights_only=True) for f in args.kept])
        settings = f"{settings} kept weights of {' + '.join(str(f) for f in args.kept)}"
        policy.net.load_state_dict(kept_state)
        print_row(kind, args.reward, settings, before, measure_policy(), {})
    else:
        kept_state = train_and_report(
            args,
            cfg,
            policy,
            reward,
            before,
            measure_policy,
            (real, real_recon),
            kind,
            settings,
            rl_seed,
        )
    if args.save_kept is not None:
        torch.save(kept_state, args.save_kept)
    for alpha in args.interpolate:
        policy.net.load_state_dict(finetune.interpolate(reference.state_dict(), kept_state, alpha))
        on_line = measure_policy()
        print_row(kind, args.reward, f"{settings} interpolated {alpha}", before, on_line, {})
        if args.grids is not None:
            save_grids(args.grids, before, on_line, args.per_class, num_classes, f"after_{alpha}")


if __name__ == "__main__":
    main()
