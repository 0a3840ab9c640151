"""Stage `finetune`: GRPO fine-tuning of the prior against the reward judge.

Each step takes `prompts_per_step` class labels (cycled through the classes) and samples
`group_size` images for each from the current policy; the rewards (genpipe.rewards) become
advantages within each group (`advantage`, `adv_std_floor`); `inner_iters` updates then
follow the clipped surrogate plus beta times the KL to the frozen prior (genpipe.rl; with
`kl_penalty: reward`, beta times each sample's log-ratio to the prior is taken off its reward
instead), both taken per action: a whole code grid for `ar` (sampled from the served top-k/top-p
distribution; KL exact per code unless `kl_estimator: k3`); each Gaussian step of
stochastic DDIM for `diffusion` (a random share of them; k3 KL).

Rails: the KL per sample (over the whole generation) and the mean reward are measured on
every batch and averaged over the last `rail_window` batches; past `kl_bound` training stops,
and the weights kept are those with the best averaged reward within the bound (with `ema`,
the moving average of the weights at that step; with `policies` > 1, the average of that
many runs' kept weights, each run from the prior with its own rollout seed; with
`interpolate` < 1, a point on the line from the prior to them). The reward
saturates at `confidence_cap`, and RL samples with the prior's own guidance unless
`cfg_scale` says otherwise, since that is how the fine-tuned prior is evaluated and served.
Before/after metrics sample as the prior file says and are judged by the evaluator, which RL
never sees, so reward hacking of the reward judge shows as a gap between the two judges.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from genpipe import artifacts, curves, evaluation, rl, viz
from genpipe.artifacts.generator import load_generator
from genpipe.artifacts.judges import load_judge
from genpipe.checkpoint import Checkpoint
from genpipe.config import Finetune, Params
from genpipe.data.prepared import load_split
from genpipe.distributed import SINGLE, World
from genpipe.generator import Generator
from genpipe.modelio import read_model_file, save_model
from genpipe.outputs import write_json
from genpipe.rewards import REALISM_SEED_OFFSET, RewardContext, WeightedReward, build_reward
from genpipe.rl import Policy, Rollout
from genpipe.runtime import cpu_threads
from genpipe.spec import StageContext, StageSpec
from genpipe.training import EMA, param_groups, steps

SPEC = StageSpec(
    "finetune",
    params=("prior", "finetune"),
    deps=(artifacts.PREPARED, artifacts.PRIOR, artifacts.TOKENIZER, artifacts.JUDGES),
    outs=(artifacts.FINETUNE,),
    metrics=artifacts.metrics("finetune"),
    plots=artifacts.plots("finetune"),
    entry_points="finetune.reward_entry_points",
)


def make_policy(gen: Generator, cfg: Finetune) -> tuple[Policy, nn.Module]:
    """(policy that trains gen.prior in place, frozen copy of the prior it starts from).
    cfg_scale null samples with the prior's own guidance, as evaluation and serving do."""
    reference = copy.deepcopy(gen.prior).eval().requires_grad_(False)
    cfg_scale = cfg.cfg_scale
    if cfg_scale is None:
        cfg_scale = float(gen.sampling.get("cfg_scale", 1.0))
    policy = gen.kind_of.policy(gen, reference, cfg, cfg_scale)
    if cfg.kl_estimator == "exact" and not hasattr(policy, "kl"):
        raise ValueError(
            f"finetune.kl_estimator: 'exact' needs a policy that computes the KL (ar); "
            f"the {gen.kind!r} prior's does not: set it to 'k3'"
        )
    return policy, reference


def prompts(step: int, cfg: Finetune, num_classes: int, device: torch.device) -> torch.Tensor:
    """Labels of one step, each repeated group_size times; classes cycle across steps."""
    first = step * cfg.prompts_per_step
    labels = (first + torch.arange(cfg.prompts_per_step)) % num_classes
    return labels.repeat_interleave(cfg.group_size).to(device)


def group_loss(
    policy: Policy, roll: Rollout, adv: torch.Tensor, cfg: Finetune
) -> tuple[torch.Tensor, torch.Tensor]:
    """(clipped surrogate + beta * KL to the prior, clip fraction) of one group's rollout; with
    `kl_penalty: reward` the KL is already in the advantages and the loss is the surrogate."""
    logp = policy.log_prob(roll)
    surrogate, clip_frac = rl.clipped_surrogate(logp, roll.old_logp, adv, cfg.clip_eps)
    if cfg.kl_penalty == "reward":
        return surrogate, clip_frac
    exact = roll.exact_kl is not None  # the policy has `kl` and the params asked for it
    kl = policy.kl(roll) if exact else rl.kl_k3(logp, roll.ref_logp)  # type: ignore[attr-defined]
    return surrogate + cfg.beta * kl.mean(), clip_frac


def update(
    policy: Policy,
    opt: torch.optim.Optimizer,
    rolls: list[Rollout],
    advs: list[torch.Tensor],
    cfg: Finetune,
    world: World = SINGLE,
) -> dict[str, float]:
    """`inner_iters` steps on the batch's loss: the mean of its groups' losses (they have the
    same number of terms, so this is the whole batch's mean). Each group's gradient is taken
    alone and the sum is added in global group order over torchrun's ranks, so N processes
    take one process's steps, to the byte. Returns the mean loss and clip fraction."""
    params = [p for p in policy.net.parameters() if p.requires_grad]
    stats = []
    for _ in range(cfg.inner_iters):
        grads, per_group = [], []
        for roll, adv in zip(rolls, advs, strict=True):
            loss, clip_frac = group_loss(policy, roll, adv, cfg)
            grads.append(
                torch.autograd.grad(loss / cfg.prompts_per_step, params, allow_unused=True)
            )
            per_group.append(torch.stack([loss.detach().float(), clip_frac.float()]))
        opt.zero_grad(set_to_none=True)
        world.sum_group_gradients(params, grads)
        if cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(policy.net.parameters(), cfg.grad_clip)
        opt.step()
        stats.append(world.gather_groups(torch.stack(per_group).cpu(), 1).mean(dim=0))
    loss, clip = torch.stack(stats).mean(dim=0).tolist()
    return {"loss": loss, "clip_frac": clip}


def advantages(rewards: torch.Tensor, roll: Rollout, cfg: Finetune) -> torch.Tensor:
    """Group advantages as `finetune.advantage` and `finetune.adv_std_floor` say, of the reward
    less beta * log(p_policy / p_prior) of each sample under `kl_penalty: reward`.

    Why the reward: the KL as a loss term (`loss`) differentiates each visited state's KL but
    not how an action changes the states after it, so its fixed point is not the tilt p_prior
    exp(reward / beta) that KL-regularised RL should reach; the log-ratio in the reward is the
    textbook score-function gradient of the whole KL, whose fixed point is that tilt."""
    if cfg.kl_penalty == "reward":
        rewards = rewards - cfg.beta * roll.log_ratio_per_sample().to(rewards)
    return rl.group_advantages(rewards, cfg.group_size, cfg.advantage, cfg.adv_std_floor)


def gathered(world: World, per_group: list[torch.Tensor], group_size: int) -> torch.Tensor:
    """Every rank's per-sample values of a step, in global order (on the CPU)."""
    return world.gather_groups(torch.cat([t.detach().cpu() for t in per_group]), group_size)


def window_mean(rows: list[dict[str, float]], key: str, window: int) -> float:
    """Mean of `key` over the last `window` rows, or over all of them while there are fewer
    (a slice start of len - window + 1 turns negative there and drops early rows)."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    recent = rows[max(0, len(rows) - window) :]
    return sum(r[key] for r in recent) / len(recent)


@dataclass
class Result:
    history: list[dict[str, float]]
    # step, reward and kl (averaged over rail_window), state (weights), with `finetune.ema`
    # ema_state (the EMA's weights at that step)
    best: dict[str, Any]
    stopped_early: bool
    steps_run: int


def train(
    policy: Policy,
    reward: WeightedReward,
    cfg: Finetune,
    num_classes: int,
    generator: torch.Generator,
    checkpoint: Checkpoint | None = None,
    world: World = SINGLE,
) -> Result:
    """GRPO for cfg.steps steps (resuming `checkpoint`), plus one last batch that only measures
    the final weights. Each batch measures the weights that drew it, averaged over the last
    `rail_window` batches: one batch's mean reward is too noisy to rank weights by (a lucky
    early batch would win), and one batch's k3 KL too heavy-tailed to stop on. Training stops
    when that KL passes kl_bound; the weights with the best averaged reward within it are
    kept. Rows whose batch made no update have NaN loss and clip fraction. With `cfg.ema` an
    EMA of the weights, started at the prior's, is kept beside them: at a fixed decay it
    averages the late steps' noise around where the policy settles (Polyak averaging), which
    the KL rail does not see but the evaluator does.

    Each group is sampled, scored and differentiated alone, from its own generator seeded by
    one draw of `generator` and its index in the step (`World.group_generators`): under
    torchrun each rank takes whole groups of the step's prompts (`world.shard_groups`), so
    advantages stay within a group, group g draws the same samples on whichever rank, and a
    row's statistics are over every rank's samples in global order. N processes therefore
    give one process's bytes, and every rank takes the same decisions."""
    net = policy.net
    opt = torch.optim.AdamW(param_groups(net, cfg.weight_decay), lr=cfg.lr)
    ema = EMA(net, cfg.ema) if cfg.ema > 0 else None
    history: list[dict[str, float]] = []
    best: dict[str, Any] = {}
    start = 0
    if checkpoint is not None and (state := checkpoint.resume([generator])) is not None:
        net.load_state_dict(state["net"])
        opt.load_state_dict(state["opt"])
        if ema is not None:
            ema.model.load_state_dict(state["ema"])
        history, best, start = state["history"], state["best"], state["step"]
    stopped = False
    device = next(net.parameters()).device
    group = cfg.group_size
    for step in steps(start, cfg.steps + 1, "finetune", quiet=not world.is_main):
        labels = world.shard_groups(prompts(step, cfg, num_classes, device), group)
        rngs = world.group_generators(generator, cfg.prompts_per_step)
        rolls = [policy.rollout(y, g) for y, g in zip(labels.split(group), rngs, strict=True)]
        scored = [reward(r.images.cpu(), r.labels.cpu()) for r in rolls]
        totals = [total for total, _ in scored]
        rewards = gathered(world, totals, group)
        diversity = torch.tensor([rl.group_diversity(r.images, group) for r in rolls])
        row = {
            "step": step,
            "reward_mean": float(rewards.mean()),
            "reward_std": float(rewards.std()),
            "kl": float(gathered(world, [r.kl_per_sample() for r in rolls], group).mean()),
            "diversity": float(world.gather_groups(diversity, 1).mean()),
            **{
                f"reward_{name}": float(gathered(world, [p[name] for _, p in scored], group).mean())
                for name in scored[0][1]
            },
        }
        recent = [*history[-cfg.rail_window :], row]
        for key in ("reward_mean", "kl"):
            row[f"{key}_window"] = window_mean(recent, key, cfg.rail_window)
        row.update(loss=math.nan, clip_frac=math.nan)
        stopped = row["kl_window"] > cfg.kl_bound
        if not stopped and row["reward_mean_window"] > best.get("reward", -math.inf):
            best = {
                "step": step,
                "reward": row["reward_mean_window"],
                "kl": row["kl_window"],
                "state": {k: v.detach().clone() for k, v in net.state_dict().items()},
            }
            if ema is not None:
                best["ema_state"] = {k: v.clone() for k, v in ema.model.state_dict().items()}
        if stopped or step == cfg.steps:
            history.append(row)
            curves.emit(row)
            break
        advs = [advantages(total, r, cfg) for total, r in zip(totals, rolls, strict=True)]
        row.update(update(policy, opt, rolls, advs, cfg, world))
        if ema is not None:
            ema.update(net)
        history.append(row)
        curves.emit(row)
        if checkpoint is not None:
            state = {"net": net.state_dict(), "opt": opt.state_dict(), "history": history}
            if ema is not None:
                state["ema"] = ema.model.state_dict()
            checkpoint.maybe_save(step, cfg.steps, {**state, "best": best}, [generator])
    steps_run = sum(not math.isnan(r["loss"]) for r in history)
    return Result(history, best, stopped, steps_run)


def train_policies(
    policy: Policy,
    reference: nn.Module,
    reward: WeightedReward,
    cfg: Finetune,
    num_classes: int,
    ctx: StageContext,
    seed: int,
) -> list[Result]:
    """`cfg.policies` GRPO runs, each from the prior's weights with rollouts of its own: run 0
    with the stage's generator and checkpoint (one policy is the single run, to the byte), run
    i with a generator seeded `seed + i` and a checkpoint part of its own (a resumed stage
    replays the finished runs' tails from their last checkpoints, deterministically)."""
    results = []
    for i in range(cfg.policies):
        if i:
            policy.net.load_state_dict(reference.state_dict())
        generator = torch.Generator().manual_seed(seed + i) if i else ctx.generator
        checkpoint = (
            ctx.checkpoint.part(f"policy{i}", cfg.checkpoint_every) if i else ctx.checkpoint
        )
        results.append(train(policy, reward, cfg, num_classes, generator, checkpoint, ctx.world))
    return results


def average(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The mean of several weights of one architecture (float entries; others: the first's).
    Policies RL'd from one prior with other seeds share the direction the reward pulls in and
    differ in their drift, which the mean shrinks by about sqrt(n) (WARP, Rame et al. 2024)."""
    if len(states) == 1:
        return states[0]
    return {
        k: torch.stack([s[k] for s in states]).mean(0) if v.is_floating_point() else v
        for k, v in states[0].items()
    }


def interpolate(
    base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor], alpha: float
) -> dict[str, torch.Tensor]:
    """The weights alpha of the way from `base` to `tuned` (float entries; others: tuned's).
    Along this line reward tends to rise faster than the distance from the prior grows, so a
    long run taken back part of the way can beat a short run (WiSE-FT; WARP's LITI)."""
    return {
        k: base[k] + alpha * (v - base[k]) if v.is_floating_point() else v for k, v in tuned.items()
    }


@torch.no_grad()
def score(
    gen: Generator,
    judges: dict[str, nn.Module],
    reward: WeightedReward,
    test_x: torch.Tensor,
    num_classes: int,
    per_class: int,
    seed: int,
) -> tuple[dict[str, float], torch.Tensor]:
    """Class-ordered samples with the prior file's own sampling settings, scored by the
    evaluator (class consistency, FID against the test split) and by the reward."""
    images, labels, _ = evaluation.generate(gen, per_class, num_classes, seed)
    total, _ = reward(images, labels)
    evaluator = judges["evaluator"]
    return {
        "class_consistency": evaluation.class_consistency(evaluator, images, labels),
        "fid": evaluation.fid(evaluation.FeatureExtractor(evaluator), test_x, images),
        "reward_mean": float(total.mean()),
        "reward_judge_consistency": evaluation.class_consistency(judges["reward"], images, labels),
    }, images


def reward_context(
    gen: Generator, judge: nn.Module, cfg: Finetune, seed: int, root: Path
) -> RewardContext:
    """What built-in rewards read: the reward judge, and lazily (only `realism` asks) the
    train split and a draw of the prior as it is now, which must be before any training."""
    num_classes = int(gen.prior.num_classes)  # type: ignore[arg-type]
    return RewardContext(
        judge,
        cfg.confidence_cap,
        lambda: load_split("train", root / artifacts.PREPARED),
        lambda: evaluation.generate(
            gen, cfg.realism_samples_per_class, num_classes, seed + REALISM_SEED_OFFSET
        )[:2],
        cfg.realism_k,
    )


def run(params: Params, root: Path = Path(".")) -> dict[str, Any]:
    cfg = params.finetune
    prior_path = root / artifacts.PRIOR / artifacts.PRIOR_FILE
    prior_file = read_model_file(prior_path, "prior")
    gen = load_generator(root / artifacts.TOKENIZER_FILE, prior_path)
    num_classes = int(gen.prior.num_classes)  # type: ignore[arg-type]
    judges = {role: load_judge(root, role, num_classes) for role in artifacts.JUDGE_ROLES}
    context = reward_context(gen, judges["reward"], cfg, params.base.seed, root)
    reward = build_reward(cfg.rewards, cfg.reward_entry_points, context, root)
    test_x, _ = load_split("test", root / artifacts.PREPARED)
    ctx = SPEC.start(params, root, cfg.checkpoint_every)
    gen = gen.to(ctx.device).requires_grad_(False)
    gen.prior.requires_grad_(True)
    policy, reference = make_policy(gen, cfg)
    seed = params.base.seed
    if not ctx.world.is_main:  # other torchrun ranks sample and train alongside rank 0
        with cpu_threads(ctx.device):
            train_policies(policy, reference, reward, cfg, num_classes, ctx, seed)
        return {}
    extra = prior_file["extra"]
    base = Generator(gen.tokenizer, reference, gen.kind, gen.sampling, extra.get("formulation"))
    n = cfg.eval_samples_per_class

    with SPEC.record(params, root) as (run, (out, metrics_path, plots)):
        before, before_images = score(
            base, judges, reward, test_x, num_classes, n, params.base.seed
        )
        with cpu_threads(ctx.device):  # scoring's batches of thousands keep every thread
            results = train_policies(policy, reference, reward, cfg, num_classes, ctx, seed)
        kept = average([r.best["ema_state" if cfg.ema > 0 else "state"] for r in results])
        if cfg.interpolate < 1:
            kept = interpolate(reference.state_dict(), kept, cfg.interpolate)
        policy.net.load_state_dict(kept)
        after, after_images = score(gen, judges, reward, test_x, num_classes, n, params.base.seed)
        metrics = {
            "before": before,
            "after": after,
            "steps_run": sum(r.steps_run for r in results),
            "stopped_early": any(r.stopped_early for r in results),
            "best_step": max(r.best["step"] for r in results),
            # the kept weights' KL; with several policies their mean (the average's is not
            # measured)
            "kl_final": sum(r.best["kl"] for r in results) / len(results),
        }
        save_model(
            out / artifacts.PRIOR_FILE, "prior", prior_file["arch"], policy.net.cpu(), **extra
        )
        write_json(metrics_path, metrics)
        history = [
            {**row, **({"policy": i} if cfg.policies > 1 else {})}
            for i, r in enumerate(results)
            for row in r.history
        ]
        curve = [{**row, "kl_bound": cfg.kl_bound} for row in history]
        viz.write_curve(curve, plots / "reward.csv")  # KL drawn against its bound
        for name, images in (("before", before_images), ("after", after_images)):
            grid = viz.class_grid(images, n, num_classes)
            viz.save_png(grid, plots / f"samples_{name}.png")
            run.log_image(grid, f"samples_{name}.png")
        run.log_metrics(metrics)
        run.log_history([{k: v for k, v in r.items() if math.isfinite(v)} for r in history])
    ctx.checkpoint.clear()
    return metrics
