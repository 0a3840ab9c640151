"""RL fine-tuning: GRPO pieces, the KL estimator, diffusion step log-probs, rewards, and a few
real steps of the stage's training loop on tiny models."""

from __future__ import annotations

import math

import pytest
import torch

from genpipe import rl
from genpipe.checkpoint import Checkpoint
from genpipe.config import Finetune, ParamsError, parse_params
from genpipe.distributed import SINGLE
from genpipe.generator import Generator
from genpipe.models import diffusion
from genpipe.models.priors.ar import ARPrior
from genpipe.models.priors.diffusion import Denoiser
from genpipe.models.tokenizer import VQAutoencoder
from genpipe.rewards import (
    BUILTINS,
    RewardContext,
    RewardError,
    WeightedReward,
    build_reward,
    compressibility,
    realism,
)
from genpipe.spec import StageContext
from genpipe.stages import finetune

CLASSES = 3


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest


# ---------------------------------------------------------------- pure pieces


def test_group_advantages_normalise_within_each_group():
    rewards = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 10.0, -5.0, 0.0, 5.0])
    adv = rl.group_advantages(rewards, 3).view(3, 3)
    assert torch.allclose(adv.mean(dim=1), torch.zeros(3), atol=1e-6)
    assert torch.allclose(adv[0], adv[2], atol=1e-3)  # same ranks, scale removed
    assert torch.allclose(adv[0].std(unbiased=False), torch.tensor(1.0), atol=1e-3)
    assert torch.equal(adv[1], torch.zeros(3))  # no signal, no blow-up
    with pytest.raises(ValueError, match="groups of 4"):
        rl.group_advantages(rewards, 4)


def _near_tie_and_failure() -> torch.Tensor:
    """Two groups of 8 at a capped log-confidence: seven at the cap (0.99) and one a hair
    below it (0.989), then seven at the cap and one misclassified (0.1)."""
    cap = math.log(0.99)
    near = torch.tensor([cap] * 7 + [math.log(0.989)])
    wrong = torch.tensor([cap] * 7 + [math.log(0.1)])
    return torch.cat([near, wrong])


def test_plain_grpo_inflates_a_near_tie_to_almost_a_failure():
    adv = rl.group_advantages(_near_tie_and_failure(), 8)
    assert adv[7].item() == pytest.approx(-2.04, abs=0.01)
    assert adv[15].item() == pytest.approx(-2.65, abs=0.01)


def test_std_floor_and_dr_grpo_keep_a_near_tie_small_against_a_failure():
    rewards = _near_tie_and_failure()
    for adv in (
        rl.group_advantages(rewards, 8, std_floor=0.1),
        rl.group_advantages(rewards, 8, mode="dr_grpo"),
    ):
        assert adv.view(2, 8).mean(dim=1).abs().max() < 1e-6
        assert abs(adv[7].item()) < 0.01 * abs(adv[15].item())
    floored = rl.group_advantages(rewards, 8, std_floor=0.1)
    assert floored[15].item() == pytest.approx(-2.65, abs=0.01)  # above the floor: unchanged
    dr = rl.group_advantages(rewards, 8, mode="dr_grpo")
    assert dr[15].item() == pytest.approx(7 / 8 * (math.log(0.1) - math.log(0.99)), rel=1e-5)
    with pytest.raises(ValueError, match="advantage mode"):
        rl.group_advantages(rewards, 8, mode="ppo")


def test_clipped_surrogate_gradient_raises_log_prob_of_advantaged_samples():
    old = torch.tensor([-2.0, -2.0])
    logp = old.clone().requires_grad_(True)
    loss, clip_frac = rl.clipped_surrogate(logp, old, torch.tensor([1.0, -1.0]), 0.2)
    loss.backward()
    assert logp.grad[0] < 0 < logp.grad[1]  # gradient descent: up for A > 0, down for A < 0
    assert clip_frac == 0


def test_clipped_surrogate_stops_pushing_outside_the_trust_region():
    old = torch.zeros(4)
    logp = torch.log(torch.tensor([1.5, 0.5, 1.5, 0.5])).requires_grad_(True)
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0])
    loss, clip_frac = rl.clipped_surrogate(logp, old, adv, 0.2)
    loss.backward()
    assert clip_frac == 1.0
    # already pushed past the clip in the advantage's direction: no more gradient
    assert logp.grad[0] == 0 and logp.grad[1] == 0
    # moved the wrong way: the unclipped term keeps pulling back
    assert logp.grad[2] > 0 and logp.grad[3] < 0


def test_clipped_surrogate_broadcasts_advantages_over_steps():
    logp = torch.zeros(2, 5, requires_grad=True)
    loss, _ = rl.clipped_surrogate(logp, torch.zeros(2, 5), torch.tensor([1.0, -1.0]), 0.2)
    loss.backward()
    assert (logp.grad[0] < 0).all() and (logp.grad[1] > 0).all()


def test_kl_k3_matches_analytic_kl_of_two_gaussians():
    g = torch.Generator().manual_seed(0)
    p = torch.distributions.Normal(0.0, 1.0)
    q = torch.distributions.Normal(0.5, 1.3)
    x = torch.randn(400_000, generator=g, dtype=torch.float64)  # drawn from p
    est = rl.kl_k3(p.log_prob(x), q.log_prob(x))
    analytic = torch.distributions.kl_divergence(p, q).item()
    assert (est >= 0).all()
    assert est.mean().item() == pytest.approx(analytic, rel=0.02)


def test_kl_k3_matches_analytic_kl_of_two_categoricals():
    p = torch.distributions.Categorical(probs=torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64))
    q = torch.distributions.Categorical(probs=torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64))
    torch.manual_seed(0)
    x = p.sample((400_000,))
    est = rl.kl_k3(p.log_prob(x), q.log_prob(x)).mean().item()
    assert est == pytest.approx(torch.distributions.kl_divergence(p, q).item(), rel=0.02)


def test_grpo_on_a_bandit_moves_mass_to_the_rewarded_action():
    """The pieces together: a 4-armed categorical policy learns that arm 2 pays."""
    g = torch.Generator().manual_seed(0)
    logits = torch.zeros(4, requires_grad=True)
    ref = torch.zeros(4)
    opt = torch.optim.Adam([logits], lr=0.1)
    for _ in range(30):
        with torch.no_grad():
            arms = torch.multinomial(logits.softmax(0), 16, replacement=True, generator=g)
            old = logits.log_softmax(0)[arms]
        adv = rl.group_advantages((arms == 2).float(), 8)
        for _ in range(2):
            logp = logits.log_softmax(0)[arms]
            loss, _ = rl.clipped_surrogate(logp, old, adv, 0.2)
            loss = loss + 0.01 * rl.kl_k3(logp, ref.log_softmax(0)[arms]).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert logits.softmax(0)[2] > 0.9


def test_log_ratio_per_sample_scales_the_scored_steps_to_the_whole_sample():
    """Two of four steps scored: their mean log-ratio, times four, estimates the sample's."""
    old, ref = torch.tensor([[1.0, 2.0], [0.0, 0.0]]), torch.tensor([[0.0, 0.0], [0.5, 0.5]])
    roll = rl.Rollout(torch.zeros(2), torch.zeros(2), old, ref, None, 4)
    assert roll.log_ratio_per_sample().tolist() == [6.0, -2.0]


def bandit_with_kl_penalty_in_the_reward(advantage: str, kl_penalty: str) -> torch.Tensor:
    """Final arm probabilities of the finetune stage's advantages and loss on a 3-armed
    bandit with rewards 0, 0.5, 1, a uniform prior and beta 1."""
    g = torch.Generator().manual_seed(0)
    payoff, ref = torch.tensor([0.0, 0.5, 1.0]), torch.zeros(3).log_softmax(0)
    cfg = Finetune(group_size=8, advantage=advantage, adv_std_floor=0, beta=1.0)
    cfg = cfg.model_copy(update={"kl_penalty": kl_penalty})
    logits = torch.zeros(3, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=0.02)
    for _ in range(600):
        with torch.no_grad():
            arms = torch.multinomial(logits.softmax(0), 64, replacement=True, generator=g)
            old = logits.log_softmax(0)[arms][:, None]
        roll = rl.Rollout(arms, arms, old, ref[arms][:, None], arms, 1)
        adv = finetune.advantages(payoff[arms], roll, cfg)
        logp = logits.log_softmax(0)[arms][:, None]
        loss, _ = rl.clipped_surrogate(logp, old, adv, cfg.clip_eps)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return logits.detach().softmax(0)


@pytest.mark.parametrize("advantage", ["dr_grpo", "grpo"])
def test_kl_in_the_reward_settles_at_the_tilt_of_the_prior(advantage):
    """KL-regularised RL's optimum is p_prior exp(r / beta), known here in closed form; the
    reward's log-ratio term must reach it (group normalisation rescales each group's step,
    not where they stop), where the reward alone would pile onto the best arm."""
    tilt = torch.tensor([0.0, 0.5, 1.0]).softmax(0)  # 0.186, 0.307, 0.506
    probs = bandit_with_kl_penalty_in_the_reward(advantage, "reward")
    assert torch.allclose(probs, tilt, atol=0.04), probs
    assert bandit_with_kl_penalty_in_the_reward(advantage, "loss")[2] > 0.8  # no penalty in it


def test_group_diversity_is_zero_for_identical_groups():
    same = torch.ones(4, 1, 2, 2)
    assert rl.group_diversity(same, 2) == 0
    mixed = torch.cat([torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2)])
    assert rl.group_diversity(mixed, 2) == pytest.approx(2.0)


def test_step_log_prob_matches_torch_normal():
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(3, 4, 2, 2, generator=g)
    x = torch.randn(3, 4, 2, 2, generator=g)
    expected = torch.distributions.Normal(mean, 0.37).log_prob(x).flatten(1).sum(1)
    assert torch.allclose(diffusion.step_log_prob(x, mean, 0.37), expected, atol=1e-4)


def test_ddim_trajectory_steps_are_scored_by_their_gaussian():
    net = tiny_denoiser()
    form = diffusion.make_formulation("flow_matching")
    labels = torch.tensor([0, 2])
    traj = diffusion.sample_trajectory(net, form, labels, torch.Generator().manual_seed(0), 4)
    i = 1
    mean, std = diffusion.ddim_step(
        net, form, traj.xs[i], float(traj.times[i]), float(traj.times[i + 1]), labels, eta=1.0
    )
    expected = torch.distributions.Normal(mean, std).log_prob(traj.xs[i + 1]).flatten(1).sum(1)
    got = diffusion.step_log_prob(traj.xs[i + 1], mean, std)
    assert torch.allclose(got, expected, rtol=1e-5)


# ---------------------------------------------------------------- rewards


def test_config_takes_reward_names_from_rewards_builtins(monkeypatch):
    monkeypatch.setitem(BUILTINS, "sharpness", lambda ctx: compressibility)
    assert Finetune(rewards={"sharpness": 1.0}).rewards == {"sharpness": 1.0}
    monkeypatch.delitem(BUILTINS, "compressibility")
    with pytest.raises(
        ValueError, match="unknown reward; allowed: class_confidence, realism, sharpness"
    ):
        Finetune(rewards={"compressibility": 1.0})


def test_class_confidence_is_log_prob_of_the_requested_class():
    judge = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, CLASSES))
    reward = build_reward({"class_confidence": 1.0}, {}, RewardContext(judge))
    images, labels = torch.rand(5, 1, 2, 2), torch.tensor([0, 1, 2, 0, 1])
    total, parts = reward(images, labels)
    expected = judge(images).log_softmax(-1)[torch.arange(5), labels].detach()
    assert torch.allclose(total, expected) and torch.allclose(parts["class_confidence"], expected)


def test_class_confidence_saturates_at_the_cap():
    """Past the cap a more confident judge earns nothing: within a group of samples the judge
    already accepts, every advantage is zero and RL leaves them alone."""
    judge = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, CLASSES))
    with torch.no_grad():
        judge[1].weight.zero_()
        judge[1].bias.copy_(torch.tensor([6.0, 0.0, 0.0]))  # p(class 0) ~ 0.995
    reward = build_reward({"class_confidence": 1.0}, {}, RewardContext(judge, 0.9))
    total, _ = reward(torch.rand(4, 1, 2, 2), torch.tensor([0, 0, 1, 2]))
    assert torch.allclose(total[:2], torch.full((2,), math.log(0.9)))
    assert (total[2:] < math.log(0.9) - 1).all()  # doubted samples keep their full signal
    assert (rl.group_advantages(total[:2], 2) == 0).all()


def test_compressibility_prefers_flat_images():
    flat, noise = torch.zeros(1, 1, 16, 16), torch.rand(1, 1, 16, 16, generator=torch.Generator())
    scores = compressibility(torch.cat([flat, noise]), torch.zeros(2, dtype=torch.long))
    assert scores[0] > scores[1] and (scores < 0).all()


def test_weighted_sum_and_user_entry_point(tmp_path):
    (tmp_path / "my_rewards_mod.py").write_text(
        "def ink(images, labels):\n    return images.flatten(1).mean(1)\n"
    )
    reward = build_reward(
        {"ink": 2.0, "compressibility": 0.5}, {"ink": "my_rewards_mod:ink"}, None, tmp_path
    )
    images = torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    total, parts = reward(images, torch.zeros(3, dtype=torch.long))
    assert torch.allclose(total, 2.0 * parts["ink"] + 0.5 * parts["compressibility"])
    assert torch.allclose(parts["ink"], images.flatten(1).mean(1))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
        ("genpipe.rl:no_such_function", "has no attribute 'no_such_function'"),
        ("genpipe.rl:ADV_EPS", "not a function"),
        ("missing-colon", "expected 'module:function'"),
    ],
)
def test_bad_entry_points_are_refused_with_their_key(spec, message):
    with pytest.raises(RewardError, match=message) as err:
        build_reward({"mine": 1.0}, {"mine": spec}, None)
    assert "finetune.reward_entry_points.mine" in str(err.value)


def test_unknown_reward_name_is_refused():
    with pytest.raises(RewardError, match="finetune.rewards.nope: unknown reward; allowed"):
        build_reward({"nope": 1.0}, {}, None)


def test_reward_of_the_wrong_shape_is_refused():
    reward = WeightedReward({"bad": 1.0}, {"bad": lambda images, labels: images.mean()})
    with pytest.raises(RewardError, match="reward 'bad' must return a tensor of shape"):
        reward(torch.rand(2, 1, 2, 2), torch.zeros(2, dtype=torch.long))


class _Identity(torch.nn.Module):
    """A judge whose features are the pixels: distances in its feature space are plain."""

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


def _points(centre: tuple[float, float], n: int, seed: int) -> torch.Tensor:
    """n images of 1x1x2 pixels, scattered 0.05 around centre."""
    g = torch.Generator().manual_seed(seed)
    return (torch.tensor(centre) + 0.05 * torch.randn(n, 2, generator=g)).view(n, 1, 1, 2)


def _realism_context(k: int = 1, **kw) -> RewardContext:
    """Class 0's real images in two clusters, at (0, 0) and (1, 0); the prior draws only the
    first: it over-draws (0, 0) and never draws (1, 0)."""
    real = torch.cat([_points((0, 0), 10, 0), _points((1, 0), 10, 1)])
    prior = _points((0, 0), 20, 2)
    zeros = torch.zeros(20, dtype=torch.long)
    return RewardContext(_Identity(), 1.0, lambda: (real, zeros), lambda: (prior, zeros), k, **kw)


def test_realism_rewards_what_the_prior_under_draws_not_one_typical_image():
    """A density ratio, real over prior: a copy of a real image the prior never draws scores
    above a copy of one it over-draws (a pure distance to the real images scores both alike),
    and above the same image moved away from every real one."""
    ctx = _realism_context()
    real, _ = ctx.reference()
    reward = build_reward({"realism": 1.0}, {}, ctx)
    far = real[15:16] + torch.tensor([0.0, 0.5]).view(1, 1, 1, 2)
    total, _ = reward(torch.cat([real[0:1], real[15:16], far]), torch.zeros(3, dtype=torch.long))
    over_drawn, under_drawn, moved = total.tolist()
    assert under_drawn > over_drawn + 2
    assert under_drawn > moved + 1
    assert math.isfinite(under_drawn)  # a copy's distance is floored: its score is bounded


def test_realism_is_differentiable_in_the_images_and_keeps_no_graph_otherwise():
    """log d_prior - log d_real with the pixels as features: its gradient is the closed form
    (x - prior_nn) / d_prior^2 - (x - real_nn) / d_real^2 (both away from their floors)."""
    ctx = _realism_context()
    reward = realism(ctx)
    x = torch.tensor([0.5, 0.3]).view(1, 1, 1, 2).requires_grad_(True)
    labels = torch.zeros(1, dtype=torch.long)
    score = reward(x, labels)
    score.sum().backward()
    real, _ = ctx.reference()
    prior, _ = ctx.prior_samples()
    flat = x.detach().flatten()

    def nearest(points: torch.Tensor) -> torch.Tensor:
        pts = points.flatten(1)
        return pts[(pts - flat).norm(dim=1).argmin()]

    grad = torch.zeros(2)
    for points, sign in ((prior, 1.0), (real, -1.0)):
        diff = flat - nearest(points)
        grad += sign * diff / diff.pow(2).sum()
    torch.testing.assert_close(x.grad.flatten(), grad, atol=1e-5, rtol=1e-4)
    assert reward(x.detach(), labels).grad_fn is None


def test_realism_draws_from_the_prior_only_when_used():
    def refuse() -> tuple[torch.Tensor, torch.Tensor]:
        raise AssertionError("drew from the prior for a reward that does not need it")

    judge = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, CLASSES))
    build_reward({"class_confidence": 1.0}, {}, RewardContext(judge, 1.0, refuse, refuse))


@pytest.mark.parametrize(
    ("ctx", "message"),
    [
        (_realism_context(k=20), "finetune.realism_k: 20 neighbours, but the train split's"),
        (RewardContext(_Identity()), "needs the train split and samples of the frozen prior"),
    ],
)
def test_realism_refuses_what_it_cannot_score(ctx, message):
    with pytest.raises(RewardError, match=message):
        realism(ctx)


def test_realism_refuses_a_class_without_real_images():
    reward = realism(_realism_context())
    with pytest.raises(RewardError, match="no reference images of class 1"):
        reward(torch.rand(2, 1, 1, 2), torch.tensor([0, 1]))


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"rewards": {"nope": 1.0}}, "finetune.rewards.nope: unknown reward"),
        ({"beta": -0.1}, "finetune.beta: Input should be greater than or equal to 0"),
        (
            {"rewards": {"x": 1.0}, "reward_entry_points": {"x": "a.b"}},
            "finetune.reward_entry_points.x: expected 'module:function'",
        ),
        ({"reward_entry_points": {"compressibility": "m:f"}}, "shadows the built-in"),
        ({"rewards": {}}, "finetune.rewards"),
        ({"realism_k": 0}, "finetune.realism_k: Input should be greater than or equal to 1"),
    ],
)
def test_bad_finetune_params_are_refused_before_any_work(section, message):
    with pytest.raises(ParamsError, match=message):
        parse_params({"finetune": section})


# ---------------------------------------------------------------- the training loop


def tiny_tokenizer(codebook_size: int = 8) -> VQAutoencoder:
    torch.manual_seed(0)
    return VQAutoencoder(
        1, (4, 8), 0, 4, "vq", codebook_size=codebook_size, kmeans_init=False
    ).eval()


def tiny_denoiser() -> Denoiser:
    """Output layers randomised: a fresh adaLN-Zero net outputs exactly 0."""
    torch.manual_seed(0)
    net = Denoiser(4, (2, 2), CLASSES, dim=16, depth=1, heads=2).eval()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "modulation" in name or name.startswith("out."):
                p.normal_(0, 0.2)
    return net


def tiny_generator(kind: str) -> Generator:
    if kind == "ar":
        torch.manual_seed(0)
        prior = ARPrior(8, (2, 2), CLASSES, dim=16, depth=1, heads=2)
        return Generator(tiny_tokenizer(), prior, "ar", {"cfg_scale": 2.0})
    sampling = {"cfg_scale": 2.0, "sampler": "euler", "steps": 4}
    return Generator(tiny_tokenizer(), tiny_denoiser(), "diffusion", sampling, {"name": "edm"})


def brightness(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return images.flatten(1).mean(1)


CFG = Finetune(steps=4, group_size=3, prompts_per_step=2, inner_iters=2, lr=1e-2, kl_bound=1e6)


@pytest.mark.parametrize("kind", ["ar", "diffusion"])
def test_training_updates_the_policy_and_never_the_reference(kind):
    gen = tiny_generator(kind)
    policy, reference = finetune.make_policy(gen, CFG)
    frozen = {k: v.clone() for k, v in reference.state_dict().items()}
    start = {k: v.clone() for k, v in policy.net.state_dict().items()}
    reward = WeightedReward({"brightness": 1.0}, {"brightness": brightness})
    result = finetune.train(policy, reward, CFG, CLASSES, torch.Generator().manual_seed(0))
    assert all(torch.equal(v, frozen[k]) for k, v in reference.state_dict().items())
    assert not all(torch.equal(v, start[k]) for k, v in policy.net.state_dict().items())
    assert result.steps_run == 4 and len(result.history) == 5 and not result.stopped_early
    assert result.history[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # policy == prior at first
    assert all(math.isfinite(r["clip_frac"]) for r in result.history[:-1])


@pytest.mark.parametrize("window", [1, 3])
def test_kl_bound_stops_early_and_keeps_the_best_batch_within_it(window):
    gen = tiny_generator("ar")
    policy, _ = finetune.make_policy(gen, CFG)
    cfg = CFG.model_copy(
        update={"steps": 20, "lr": 0.1, "beta": 0.0, "kl_bound": 0.05, "rail_window": window}
    )
    reward = WeightedReward({"brightness": 1.0}, {"brightness": brightness})
    result = finetune.train(policy, reward, cfg, CLASSES, torch.Generator().manual_seed(0))
    history = result.history
    assert result.stopped_early and history[-1]["kl_window"] > cfg.kl_bound
    for i, row in enumerate(history):  # the rails average the last `window` batches
        recent = history[max(0, i - window + 1) : i + 1]
        assert row["kl_window"] == pytest.approx(sum(r["kl"] for r in recent) / len(recent))
    within = [r for r in history if r["kl_window"] <= cfg.kl_bound]
    assert result.best["reward"] == max(r["reward_mean_window"] for r in within)


def test_window_mean_averages_every_row_while_fewer_than_the_window():
    rows = [{"kl": float(v)} for v in (0, 4, 8, 2, 6, 10)]
    # window 5: rows 0..3 average all rows so far, then the last five
    expected = [0.0, 2.0, 4.0, 3.5, 4.0, 6.0]
    got = [finetune.window_mean(rows[: i + 1], "kl", 5) for i in range(len(rows))]
    assert got == pytest.approx(expected)
    assert finetune.window_mean(rows, "kl", 1) == 10.0
    with pytest.raises(ValueError, match="window must be >= 1"):
        finetune.window_mean(rows, "kl", 0)


def test_rail_window_counts_every_early_batch_before_stopping():
    """Window 5 over steps 0..4, where fewer batches than the window exist: a window that
    dropped early batches (low KL, the policy still near the prior) would stop too soon."""
    gen = tiny_generator("ar")
    policy, _ = finetune.make_policy(gen, CFG)
    cfg = CFG.model_copy(
        update={"steps": 10, "lr": 0.01, "beta": 0.0, "kl_bound": 1.0, "rail_window": 5}
    )
    reward = WeightedReward({"brightness": 1.0}, {"brightness": brightness})
    result = finetune.train(policy, reward, cfg, CLASSES, torch.Generator().manual_seed(0))
    history = result.history
    for i, row in enumerate(history):
        recent = history[max(0, i - 4) : i + 1]
        assert row["kl_window"] == pytest.approx(sum(r["kl"] for r in recent) / len(recent))
        assert row["reward_mean_window"] == pytest.approx(
            sum(r["reward_mean"] for r in recent) / len(recent)
        )
    assert len(history) > 4, "the run must reach a full window to test the early steps"
    assert all(r["kl_window"] <= cfg.kl_bound for r in history[:-1])
    assert result.stopped_early == (history[-1]["kl_window"] > cfg.kl_bound)


def test_resume_from_a_checkpoint_gives_the_same_result(tmp_path):
    cfg = CFG.model_copy(update={"checkpoint_every": 2})
    reward = WeightedReward({"brightness": 1.0}, {"brightness": brightness})

    def run(checkpoint):
        policy, _ = finetune.make_policy(tiny_generator("ar"), cfg)
        result = finetune.train(
            policy, reward, cfg, CLASSES, torch.Generator().manual_seed(0), checkpoint
        )
        return result, policy.net.state_dict()

    checkpoint = Checkpoint(tmp_path / "last.pt", "fingerprint", cfg.checkpoint_every)
    straight, weights = run(checkpoint)  # also leaves the checkpoint after step 2
    assert checkpoint.load()["step"] == 2
    resumed, resumed_weights = run(checkpoint)
    assert resumed.history == straight.history
    assert all(torch.equal(v, weights[k]) for k, v in resumed_weights.items())


def test_ema_keeps_the_average_of_the_weights_after_each_update_from_the_prior(monkeypatch):
    """best['ema_state'] at the kept step s is e_s, where e_0 = the prior's weights and
    e_t = d e_(t-1) + (1 - d) w_t over the weights w_t after each update."""
    decay = 0.7
    cfg = CFG.model_copy(update={"steps": 5, "ema": decay})
    policy, reference = finetune.make_policy(tiny_generator("ar"), cfg)
    after_update: list[dict[str, torch.Tensor]] = []
    real_update = finetune.update

    def recording_update(*args, **kwargs):
        out = real_update(*args, **kwargs)
        after_update.append({k: v.clone() for k, v in policy.net.state_dict().items()})
        return out

    monkeypatch.setattr(finetune, "update", recording_update)
    reward = WeightedReward({"brightness": 1.0}, {"brightness": brightness})
    result = finetune.train(policy, reward, cfg, CLASSES, torch.Generator().manual_seed(0))
    kept = result.best["step"]
    expected = {k: v.clone() for k, v in reference.state_dict().items()}
    for weights in after_update[:kept]:
        for k in expected:
            expected[k] = decay * expected[k] + (1 - decay) * weights[k]
    assert len(after_update) == cfg.steps
    got = result.best["ema_state"]
    assert all(torch.allclose(got[k], v, atol=1e-6) for k, v in expected.items())
    if kept > 0:  # the average lags the policy's own weights
        assert not all(torch.equal(got[k], v) for k, v in result.best["state"].items())


def test_resume_with_ema_gives_the_same_average(tmp_path):
    cfg = CFG.model_copy(update={"checkpoint_every": 2, "ema": 0.5})
    reward = WeightedReward({"brightness": 1.0}, {"brightness": brightness})

    def run(checkpoint):
        policy, _ = finetune.make_policy(tiny_generator("ar"), cfg)
        gen = torch.Generator().manual_seed(0)
        return finetune.train(policy, reward, cfg, CLASSES, gen, checkpoint).best

    checkpoint = Checkpoint(tmp_path / "last.pt", "fingerprint", cfg.checkpoint_every)
    straight = run(checkpoint)
    resumed = run(checkpoint)
    assert resumed["step"] == straight["step"]
    assert all(torch.equal(v, straight["ema_state"][k]) for k, v in resumed["ema_state"].items())


def test_ar_policy_scores_the_truncated_distribution_it_samples_from(monkeypatch):
    """The log-prob RL trains on is the sum of the log-probs of the very (top-p truncated,
    renormalised) distributions the codes were drawn from, as served; the reference is scored
    untruncated."""
    from genpipe.models.priors import ar

    torch.manual_seed(0)
    prior = ARPrior(32, (2, 2), CLASSES, dim=16, depth=1, heads=2).eval()
    with torch.no_grad():
        prior.head.weight.normal_(0, 0.5)  # spread logits so the nucleus drops codes
    sampling = {"cfg_scale": 2.0, "top_k": None, "top_p": 0.5}
    gen = Generator(tiny_tokenizer(32), prior, "ar", sampling)
    policy, reference = finetune.make_policy(gen, Finetune(temperature=0.8))
    drawn: list[torch.Tensor] = []
    real_draw = ar.sample_categorical

    def recording_draw(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        codes = real_draw(probs, generator)
        drawn.append(probs.gather(1, codes[:, None]).squeeze(1).log())
        assert (probs == 0).any()  # truncation removed codes
        return codes

    monkeypatch.setattr(ar, "sample_categorical", recording_draw)
    roll = policy.rollout(torch.tensor([0, 1, 2, 0]), torch.Generator().manual_seed(0))
    expected = torch.stack(drawn, dim=1).sum(dim=1)
    assert torch.allclose(roll.old_logp[:, 0], expected, atol=1e-5)
    assert torch.allclose(policy.log_prob(roll)[:, 0], expected, atol=1e-5)
    untruncated = reference.log_prob(roll.replay, roll.labels, 2.0, 0.8)
    assert torch.allclose(roll.ref_logp[:, 0], untruncated, atol=1e-5)
    assert (roll.ref_logp < roll.old_logp).all()  # renormalising raised every sampled code


def test_kl_exact_matches_analytic_kl_and_ignores_truncated_codes():
    p = torch.tensor([[[0.5, 0.5, 0.0]]])
    q = torch.tensor([[[0.25, 0.25, 0.5]]])
    got = rl.kl_exact(p.log(), q.log())
    assert got.item() == pytest.approx(math.log(2), rel=1e-6)  # 0 * log 0 counts as 0


def test_exact_kl_of_the_untrained_ar_policy_is_the_cost_of_truncation():
    """At the start policy == prior up to the nucleus, so the KL per code is -log(kept mass)."""
    torch.manual_seed(0)
    prior = ARPrior(32, (2, 2), CLASSES, dim=16, depth=1, heads=2).eval()
    with torch.no_grad():
        prior.head.weight.normal_(0, 0.5)
    gen = Generator(tiny_tokenizer(32), prior, "ar", {"cfg_scale": 2.0, "top_p": 0.5})
    policy, reference = finetune.make_policy(gen, Finetune(kl_estimator="exact"))
    roll = policy.rollout(torch.tensor([0, 1, 2, 0]), torch.Generator().manual_seed(0))
    kept = policy.net.log_probs(roll.replay, roll.labels, 2.0, 1.0, top_p=0.5).isfinite()
    full = reference.log_probs(roll.replay, roll.labels, 2.0, 1.0).exp()
    expected = -(full * kept).sum(dim=-1).log().sum(dim=1)
    assert (expected > 0.1).all()
    assert torch.allclose(roll.exact_kl, expected, atol=1e-5)
    assert torch.allclose(roll.kl_per_sample(), expected, atol=1e-5)
    kl = policy.kl(roll)
    kl.sum().backward()  # differentiable, for the penalty
    grads = [p.grad for p in policy.net.parameters() if p.grad is not None]
    assert grads and all(g.isfinite().all() for g in grads)  # no NaN from truncated codes


def test_exact_kl_is_refused_for_a_kind_without_it_and_auto_picks_it_where_there():
    with pytest.raises(ValueError, match="finetune.kl_estimator"):
        finetune.make_policy(tiny_generator("diffusion"), Finetune(kl_estimator="exact"))
    labels, rng = torch.tensor([0, 1]), torch.Generator().manual_seed(0)
    for kind, estimator, exact in [("ar", "auto", True), ("ar", "k3", False)] + [
        ("diffusion", "auto", False)
    ]:
        policy, _ = finetune.make_policy(tiny_generator(kind), Finetune(kl_estimator=estimator))
        assert (policy.rollout(labels, rng).exact_kl is not None) == exact


def test_training_with_the_exact_kl_runs_and_starts_at_zero_kl():
    gen = tiny_generator("ar")
    cfg = CFG.model_copy(update={"kl_estimator": "exact"})
    policy, _ = finetune.make_policy(gen, cfg)
    reward = WeightedReward({"brightness": 1.0}, {"brightness": brightness})
    result = finetune.train(policy, reward, cfg, CLASSES, torch.Generator().manual_seed(0))
    assert result.history[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert result.history[-1]["kl"] > 1e-4
    assert result.steps_run == 4  # every update had a finite loss


def test_ar_log_prob_of_a_truncated_code_is_a_finite_floor():
    """Sampling (KV cache) and scoring (teacher forcing) can round a boundary code to opposite
    sides of the nucleus; its log-prob must stay finite so the RL ratio is not NaN."""
    from genpipe.models.priors.ar import CODE_LOG_PROB_FLOOR

    torch.manual_seed(0)
    prior = ARPrior(32, (2, 2), CLASSES, dim=16, depth=1, heads=2).eval()
    with torch.no_grad():
        prior.head.weight.normal_(0, 0.5)
    codes, labels = torch.randint(0, 32, (6, 2, 2)), torch.tensor([0, 1, 2, 0, 1, 2])
    kept = prior.log_probs(codes, labels, 2.0, 1.0, top_p=0.3).isfinite()
    outside = ~kept.gather(-1, codes.flatten(1)[..., None]).squeeze(-1).all(dim=1)
    assert outside.any()
    logp = prior.log_prob(codes, labels, 2.0, 1.0, top_p=0.3)
    assert logp.isfinite().all() and (logp[outside] <= CODE_LOG_PROB_FLOOR).all()
    loss, _ = rl.clipped_surrogate(logp, logp.detach(), torch.ones(6), 0.2)
    assert loss.isfinite()


def test_interpolate_walks_the_line_from_the_prior_to_the_tuned_weights():
    base = {"w": torch.tensor([0.0, 2.0]), "steps": torch.tensor(3)}
    tuned = {"w": torch.tensor([4.0, -2.0]), "steps": torch.tensor(7)}
    assert torch.equal(finetune.interpolate(base, tuned, 0.25)["w"], torch.tensor([1.0, 1.0]))
    assert torch.equal(finetune.interpolate(base, tuned, 1.0)["w"], tuned["w"])
    assert torch.equal(finetune.interpolate(base, tuned, 0.0)["w"], base["w"])
    # integer buffers (counters, indices) are not averaged: the tuned model's are kept
    assert int(finetune.interpolate(base, tuned, 0.5)["steps"]) == 7


def test_interpolate_param_takes_a_share_of_the_update_in_0_1():
    assert Finetune().interpolate == 1.0  # RL's weights, as before the option
    for bad in (0.0, 1.5, -0.2):
        with pytest.raises(ValueError, match="interpolate"):
            Finetune(interpolate=bad)


def test_average_is_the_mean_of_the_float_weights():
    a = {"w": torch.tensor([0.0, 2.0]), "steps": torch.tensor(3)}
    b = {"w": torch.tensor([4.0, -2.0]), "steps": torch.tensor(7)}
    c = {"w": torch.tensor([2.0, 3.0]), "steps": torch.tensor(9)}
    merged = finetune.average([a, b, c])
    assert torch.equal(merged["w"], torch.tensor([2.0, 1.0]))
    assert int(merged["steps"]) == 3  # integer buffers: the first's, never averaged
    assert finetune.average([a]) is a  # one policy: its weights, to the byte


def test_policies_each_start_from_the_prior_with_their_own_rollout_seed(tmp_path):
    """Run i of `finetune.policies` is the single run a fresh policy makes from the prior with
    a generator seeded base.seed + i (run 0: the stage's own generator)."""
    cfg = CFG.model_copy(update={"policies": 2})
    reward = WeightedReward({"brightness": 1.0}, {"brightness": brightness})
    seed = 5
    policy, reference = finetune.make_policy(tiny_generator("ar"), cfg)
    checkpoint = Checkpoint(tmp_path / "last.pt", "fingerprint", 0)
    ctx = StageContext(torch.device("cpu"), torch.Generator().manual_seed(seed), checkpoint, SINGLE)
    torch.manual_seed(0)
    results = finetune.train_policies(policy, reference, reward, cfg, CLASSES, ctx, seed)
    assert len(results) == 2
    torch.manual_seed(0)
    for i, result in enumerate(results):
        alone, _ = finetune.make_policy(tiny_generator("ar"), cfg)
        gen = torch.Generator().manual_seed(seed + i)
        expected = finetune.train(alone, reward, cfg, CLASSES, gen).best["state"]
        got = result.best["state"]
        assert all(torch.equal(got[k], v) for k, v in expected.items()), f"policy {i}"
    first, second = (r.best["state"] for r in results)
    assert not all(torch.equal(first[k], v) for k, v in second.items())


def test_policies_resume_each_from_its_own_checkpoint(tmp_path):
    """A stage resumed with `policies: 2` replays each run from its own checkpoint part and
    ends where the uninterrupted stage did: run 1 must not resume from run 0's file."""
    cfg = CFG.model_copy(update={"policies": 2, "checkpoint_every": 2})
    reward = WeightedReward({"brightness": 1.0}, {"brightness": brightness})
    seed = 5

    def run() -> list[finetune.Result]:
        policy, reference = finetune.make_policy(tiny_generator("ar"), cfg)
        checkpoint = Checkpoint(tmp_path / "last.pt", "fingerprint", cfg.checkpoint_every)
        gen = torch.Generator().manual_seed(seed)
        ctx = StageContext(torch.device("cpu"), gen, checkpoint, SINGLE)
        return finetune.train_policies(policy, reference, reward, cfg, CLASSES, ctx, seed)

    straight = run()  # leaves each run's checkpoint after its step 2
    assert Checkpoint(tmp_path / "last.pt", "fingerprint", 2).load()["step"] == 2
    resumed = run()
    for i, (a, b) in enumerate(zip(straight, resumed, strict=True)):
        assert b.history == a.history, f"policy {i}"
        assert all(torch.equal(v, a.best["state"][k]) for k, v in b.best["state"].items())
    first, second = (r.history for r in resumed)
    assert first != second  # two runs, not one replayed twice


def test_policies_param_counts_runs_from_one():
    assert Finetune().policies == 1  # one GRPO run, as before the option
    with pytest.raises(ValueError, match="policies"):
        Finetune(policies=0)
