"""Diffusion prior: training targets, EDM preconditioning, schedules, samplers, log-probs."""

from __future__ import annotations

import math

import pytest
import torch

from genpipe.models import diffusion
from genpipe.models.diffusion import (
    DDPM,
    EDM,
    FORMULATIONS,
    SAMPLERS,
    FlowMatching,
    ddim_step,
    ddpm_target,
    denoise,
    edm_precond,
    edm_target,
    flow_matching_target,
    integrate_ode,
    make_formulation,
    sample,
    sample_trajectory,
    step_log_prob,
    vp_alpha_sigma,
)
from genpipe.models.priors.diffusion import Denoiser

D, GRID, CLASSES = 4, (3, 4), 5


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest


def make_net(seed: int = 0) -> Denoiser:
    """A denoiser whose zero-initialised output layers are randomised, so it depends on its
    inputs, time and class (a fresh adaLN-Zero net outputs exactly 0)."""
    torch.manual_seed(seed)
    net = Denoiser(D, GRID, CLASSES, dim=32, depth=2, heads=2).eval()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "modulation" in name or name.startswith("out."):
                p.normal_(0, 0.2)
    return net


ALL_FORMS = [
    FlowMatching(),
    EDM(),
    DDPM("cosine", "v"),
    DDPM("cosine", "eps"),
    DDPM("linear", "v"),
    DDPM("linear", "eps"),
]


# ---------------------------------------------------------------- targets and coefficients


def test_flow_matching_target_is_velocity():
    x0, eps = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 0.5])
    assert flow_matching_target(x0, eps, torch.tensor(0.3)).tolist() == [-0.5, 2.5]
    # the target is d/dt of the path: finite difference of (1-t) x0 + t eps
    t, h = 0.3, 1e-3
    path = lambda t: (1 - t) * x0 + t * eps  # noqa: E731
    fd = (path(t + h) - path(t - h)) / (2 * h)
    torch.testing.assert_close(fd, flow_matching_target(x0, eps, torch.tensor(t)))


def test_edm_precond_at_known_sigma():
    # sigma = sigma_data = 0.5: total variance 0.5, sqrt = 1/sqrt(2)
    c_skip, c_out, c_in, c_noise = edm_precond(torch.tensor(0.5), 0.5)
    assert math.isclose(c_skip.item(), 0.5, rel_tol=1e-6)
    assert math.isclose(c_out.item(), 0.25 * math.sqrt(2), rel_tol=1e-6)
    assert math.isclose(c_in.item(), math.sqrt(2), rel_tol=1e-6)
    assert math.isclose(c_noise.item(), math.log(0.5) / 4, rel_tol=1e-6)
    # sigma = 1.2, sigma_data = 0.5: sqrt(1.44 + 0.25) = 1.3
    c_skip, c_out, c_in, c_noise = edm_precond(torch.tensor(1.2), 0.5)
    assert math.isclose(c_skip.item(), 0.25 / 1.69, rel_tol=1e-6)
    assert math.isclose(c_out.item(), 0.6 / 1.3, rel_tol=1e-6)
    assert math.isclose(c_in.item(), 1 / 1.3, rel_tol=1e-6)
    assert math.isclose(c_noise.item(), math.log(1.2) / 4, rel_tol=1e-6)


def test_edm_target_makes_denoiser_exact():
    x0, eps, sigma = torch.tensor([0.8, -0.4]), torch.tensor([1.0, 2.0]), torch.tensor(1.2)
    target = edm_target(x0, eps, sigma, 0.5)
    # by hand: x = x0 + 1.2 eps = [2.0, 2.0]; (x0 - c_skip x) / c_out
    c_skip, c_out = 0.25 / 1.69, 0.6 / 1.3
    expected = torch.tensor([(0.8 - c_skip * 2.0) / c_out, (-0.4 - c_skip * 2.0) / c_out])
    torch.testing.assert_close(target, expected)
    x0_hat, eps_hat = EDM(sigma_data=0.5).estimates(target[None], (x0 + sigma * eps)[None], sigma)
    torch.testing.assert_close(x0_hat[0], x0)
    torch.testing.assert_close(eps_hat[0], eps)


def test_ddpm_targets():
    x0, eps = torch.tensor([1.0, -1.0]), torch.tensor([0.5, 2.0])
    alpha, sigma = torch.tensor(0.6), torch.tensor(0.8)
    assert torch.equal(ddpm_target(x0, eps, alpha, sigma, "eps"), eps)
    v = ddpm_target(x0, eps, alpha, sigma, "v")
    torch.testing.assert_close(v, torch.tensor([0.6 * 0.5 - 0.8, 0.6 * 2.0 + 0.8]))
    with pytest.raises(ValueError, match="eps, v"):
        ddpm_target(x0, eps, alpha, sigma, "x0")


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_vp_schedule_values_and_derivatives(schedule):
    t = torch.tensor([0.0, 0.1, 0.5, 0.9], dtype=torch.float64)
    alpha, sigma, dalpha, dsigma = vp_alpha_sigma(t, schedule)
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones_like(t))
    assert math.isclose(alpha[0].item(), 1.0, abs_tol=1e-12)
    assert (alpha.diff() < 0).all()
    h = 1e-6
    tt = t[1:]
    a_p, s_p, _, _ = vp_alpha_sigma(tt + h, schedule)
    a_m, s_m, _, _ = vp_alpha_sigma(tt - h, schedule)
    torch.testing.assert_close(dalpha[1:], (a_p - a_m) / (2 * h), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(dsigma[1:], (s_p - s_m) / (2 * h), rtol=1e-5, atol=1e-7)
    if schedule == "linear":  # DDPM's discrete alpha_bar_1000 = prod(1 - beta_i), betas 1e-4..0.02
        betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
        a1, _, _, _ = vp_alpha_sigma(torch.tensor(1.0, dtype=torch.float64), schedule)
        discrete = (1 - betas).log().sum().item()  # -10.12; continuous: -10.05
        assert math.isclose(2 * a1.log().item(), discrete, rel_tol=0.01)
    else:  # cosine: alpha(0.5)^2 = cos^2(pi/2 * 0.508/1.008) / cos^2(pi/2 * 0.008/1.008)
        ref = math.cos(math.pi / 2 * 0.508 / 1.008) / math.cos(math.pi / 2 * 0.008 / 1.008)
        assert math.isclose(alpha[2].item(), ref, rel_tol=1e-9)


@pytest.mark.parametrize("form", ALL_FORMS, ids=lambda f: f"{f.name}")
def test_estimates_invert_the_target(form):
    """Feeding the exact target as the net output recovers x0 and eps from x_t."""
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, D, *GRID, generator=g), torch.randn(3, D, *GRID, generator=g)
    t = torch.tensor([0.2, 0.5, 0.9]) if form.name != "edm" else torch.tensor([0.1, 1.0, 10.0])
    alpha, sigma, _, _ = form.schedule(t)
    x_t = alpha[:, None, None, None] * x0 + sigma[:, None, None, None] * eps
    x0_hat, eps_hat = form.estimates(form.target(x0, eps, t), x_t, t)
    torch.testing.assert_close(x0_hat, x0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(eps_hat, eps, atol=1e-4, rtol=1e-4)


def test_flow_matching_loss_by_hand():
    """The loss is MSE(net(x_t, t), eps - x0) with t, eps drawn from the generator in order."""
    net = make_net().train()
    net.class_dropout = 0.0
    form = FlowMatching()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, D, *GRID, generator=g)
    labels = torch.arange(4)
    loss = form.loss(net, x0, labels, torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    t = torch.rand(4, generator=g)
    eps = torch.randn(x0.shape, generator=g)
    tb = t[:, None, None, None]
    out = net((1 - tb) * x0 + tb * eps, t, labels)
    torch.testing.assert_close(loss, ((out - (eps - x0)) ** 2).mean())


@pytest.mark.parametrize("name", FORMULATIONS)
def test_loss_decreases_on_a_fixed_batch(name):
    torch.manual_seed(0)
    net = Denoiser(D, GRID, CLASSES, dim=16, depth=1, heads=2).train()
    form = make_formulation(name)
    labels = torch.arange(16) % CLASSES
    x0 = torch.randn(CLASSES, D, *GRID, generator=torch.Generator().manual_seed(0))[labels]
    opt = torch.optim.AdamW(net.parameters(), lr=2e-2)

    def avg_loss() -> float:  # same draws each time, so the comparison is noise-free
        g = torch.Generator().manual_seed(9)
        return sum(form.loss(net, x0, labels, g).item() for _ in range(8)) / 8

    before = avg_loss()
    g = torch.Generator().manual_seed(1)
    for _ in range(100):
        loss = form.loss(net, x0, labels, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert avg_loss() < 0.7 * before


# ---------------------------------------------------------------- sampling


@pytest.mark.parametrize("form", ALL_FORMS[:3], ids=lambda f: f.name)
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_sampler_determinism_and_shape(form, sampler):
    net = make_net()
    labels = torch.arange(CLASSES)
    kw = dict(steps=4, sampler=sampler, cfg_scale=2.0, eta=0.5 if sampler == "ddim" else 0.0)
    a = sample(net, form, labels, torch.Generator().manual_seed(0), **kw)
    b = sample(net, form, labels, torch.Generator().manual_seed(0), **kw)
    c = sample(net, form, labels, torch.Generator().manual_seed(1), **kw)
    assert a.shape == (CLASSES, D, *GRID) and torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_integrate_ode_keeps_a_graph_through_its_last_steps_only(sampler):
    """The reward-gradient path: the same latents as `sample`, with autograd through the last
    `grad_steps` steps (their states and derivatives returned) and none before them."""
    net = make_net().requires_grad_(True)
    labels, form = torch.arange(CLASSES), FlowMatching()
    kw = dict(steps=4, sampler=sampler, cfg_scale=2.0, interval=(0.0, 0.6))
    served = sample(net, form, labels, torch.Generator().manual_seed(0), **kw)
    x, graded = integrate_ode(
        net, form, labels, torch.Generator().manual_seed(0), **kw, grad_steps=2
    )
    assert torch.equal(x, served)
    times = form.timesteps(4).tolist()
    assert [(g.t, g.s) for g in graded] == [(times[2], times[3]), (times[3], times[4])]
    assert graded[0].x.grad_fn is None  # made by untracked steps
    assert graded[1].x.grad_fn is not None and graded[0].derivative.grad_fn is not None
    x.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    untracked, none = integrate_ode(net, form, labels, torch.Generator().manual_seed(0), **kw)
    assert untracked.grad_fn is None and none == []


def test_cfg_scale_one_is_conditional_and_zero_is_unconditional():
    net = make_net()
    form = FlowMatching()
    x = torch.randn(3, D, *GRID, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2])
    t = torch.full((3,), 0.4)
    cond = net(x, t, labels)
    x0_hat, _ = denoise(net, form, x, 0.4, labels, cfg_scale=1.0)
    torch.testing.assert_close(x0_hat, x - 0.4 * cond)
    null = torch.ones(3, dtype=torch.bool)
    uncond = net(x, t, labels, null)
    x0_hat, _ = denoise(net, form, x, 0.4, labels, cfg_scale=0.0)
    torch.testing.assert_close(x0_hat, x - 0.4 * uncond)
    x0_hat, _ = denoise(net, form, x, 0.4, labels, cfg_scale=3.0)
    torch.testing.assert_close(x0_hat, x - 0.4 * (uncond + 3.0 * (cond - uncond)))
    assert not torch.allclose(cond, uncond)


def test_cfg_scale_one_sample_equals_conditional_sample():
    """At scale 1 the unconditional rows never run: same result as a net that ignores them."""
    net = make_net()
    labels = torch.arange(CLASSES)
    a = sample(net, FlowMatching(), labels, torch.Generator().manual_seed(0), steps=3)
    net.class_emb.weight.data[CLASSES] += 100.0  # corrupt the null class only
    b = sample(net, FlowMatching(), labels, torch.Generator().manual_seed(0), steps=3)
    assert torch.equal(a, b)


def test_euler_matches_ddim_eta0():
    """In each formulation's ODE coordinates an Euler step is a deterministic DDIM step."""
    net = make_net()
    labels = torch.arange(CLASSES)
    for form in ALL_FORMS:
        a = sample(net, form, labels, torch.Generator().manual_seed(0), steps=5, sampler="euler")
        b = sample(net, form, labels, torch.Generator().manual_seed(0), steps=5, sampler="ddim")
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_ddim_recovers_a_point_mass(monkeypatch):
    """With the exact denoiser of a single data point DDIM lands on it at any eta (this
    oracle cannot tell a right ODE solver from a wrong one; see the Gaussian test below)."""
    point = torch.randn(1, D, *GRID, generator=torch.Generator().manual_seed(3))

    def oracle(net, form, x, t, labels, cfg_scale=1.0):
        alpha, sigma, _, _ = form.schedule(torch.tensor(float(t)))
        return point.expand_as(x), (x - alpha * point) / sigma

    monkeypatch.setattr(diffusion, "denoise", oracle)
    net = make_net()
    for form in ALL_FORMS:
        for eta in (0.0, 1.0):
            g = torch.Generator().manual_seed(0)
            x = sample(net, form, torch.zeros(2, dtype=torch.long), g, 8, "ddim", eta=eta)
            torch.testing.assert_close(x, point.expand_as(x), atol=1e-4, rtol=1e-4)


MU, S = 0.7, 0.4  # data x0 ~ N(MU, S^2) in every coordinate


def gaussian_oracle(net, form, x, t, labels, cfg_scale=1.0):
    """Exact (x0_hat, eps_hat) for Gaussian data: E[x0 | x_t] is linear in x_t."""
    coeffs = form.schedule(torch.tensor(float(t), dtype=torch.float64))
    alpha, sigma = float(coeffs[0]), float(coeffs[1])
    x0_hat = MU + alpha * S**2 / (alpha**2 * S**2 + sigma**2) * (x - alpha * MU)
    return x0_hat, (x - alpha * x0_hat) / sigma


def ode_error(form, sampler: str, steps: int) -> float:
    """Max error of the sampler's endpoint against the exact probability-flow ODE solution
    from the same start x_T = sigma_T z (z from the seeded generator, as the sampler draws it):
    x_0 = MU + S (x_T - alpha_T MU) / sqrt(alpha_T^2 S^2 + sigma_T^2)."""
    x = sample(
        make_net(),
        form,
        torch.zeros(4, dtype=torch.long),
        torch.Generator().manual_seed(0),
        steps,
        sampler,
    )
    alpha, sigma, _, _ = (float(c) for c in form.schedule(form.timesteps(steps)[:1]))
    x_start = sigma * torch.randn(4, D, *GRID, generator=torch.Generator().manual_seed(0))
    exact = MU + S * (x_start - alpha * MU) / math.sqrt(alpha**2 * S**2 + sigma**2)
    return float((x - exact).abs().max())


@pytest.mark.parametrize("form", [FlowMatching(), EDM()], ids=lambda f: f.name)
def test_heun_is_second_order_and_euler_first_on_gaussian_data(form, monkeypatch):
    """Each doubling of the steps divides Euler's error by about 2 and Heun's by about 4
    (measured 16 -> 32 -> 64 steps: euler 1.95, 1.98 / 1.97, 1.98; heun 4.22, 4.12 / 4.61,
    4.29 for flow matching / EDM). Heun weights 0.6 / 0.4 give 2.3, 2.2 / 4.0, 0.9."""
    monkeypatch.setattr(diffusion, "denoise", gaussian_oracle)
    steps = (16, 32, 64)
    euler = [ode_error(form, "euler", n) for n in steps]
    heun = [ode_error(form, "heun", n) for n in steps]
    for i in range(len(steps) - 1):
        assert 1.7 < euler[i] / euler[i + 1] < 2.3, euler
        assert 3.4 < heun[i] / heun[i + 1] < 5.0, heun
    assert heun[-1] < 0.2 * euler[-1]


def test_trajectory_records_gaussian_steps():
    net = make_net()
    labels = torch.arange(3)
    traj = sample_trajectory(
        net, FlowMatching(), labels, torch.Generator().manual_seed(0), steps=4, eta=1.0
    )
    assert traj.xs.shape == (5, 3, D, *GRID)
    assert traj.means.shape == (4, 3, D, *GRID) and traj.stds.shape == (4,)
    assert (traj.stds[:-1] > 0).all() and traj.stds[-1] == 0
    torch.testing.assert_close(traj.xs[-1], traj.means[-1])
    final = sample(
        net, FlowMatching(), labels, torch.Generator().manual_seed(0), 4, "ddim", eta=1.0
    )
    torch.testing.assert_close(final, traj.xs[-1])
    # a stored transition is re-scored by recomputing the step's mean under the same weights
    t, s = float(traj.times[1]), float(traj.times[2])
    mean, std = ddim_step(net, FlowMatching(), traj.xs[1], t, s, labels, eta=1.0)
    torch.testing.assert_close(mean, traj.means[1])
    assert math.isclose(std, traj.stds[1].item(), rel_tol=1e-6)
    logp = step_log_prob(traj.xs[2], mean, std)
    assert logp.shape == (3,) and torch.isfinite(logp).all()


def test_ddim_std_is_posterior_std_at_eta_one():
    """DDPM ancestral variance: (1 - abar_s) / (1 - abar_t) * (1 - abar_t / abar_s)."""
    net = make_net()
    form = DDPM("linear", "v")
    x = torch.randn(2, D, *GRID, generator=torch.Generator().manual_seed(0))
    _, std = ddim_step(net, form, x, 0.6, 0.4, torch.arange(2), eta=1.0)
    t = torch.tensor([0.6, 0.4], dtype=torch.float64)
    abar = vp_alpha_sigma(t, "linear")[0] ** 2
    var = (1 - abar[1]) / (1 - abar[0]) * (1 - abar[0] / abar[1])
    assert math.isclose(std, var.sqrt().item(), rel_tol=1e-6)
    _, std0 = ddim_step(net, form, x, 0.6, 0.4, torch.arange(2), eta=0.0)
    assert std0 == 0.0


def test_step_log_prob_matches_torch_normal():
    g = torch.Generator().manual_seed(0)
    mean, x = torch.randn(3, D, *GRID, generator=g), torch.randn(3, D, *GRID, generator=g)
    for std in (0.3, torch.tensor(0.3), torch.full((3, 1, 1, 1), 0.7)):
        expected = torch.distributions.Normal(mean, std).log_prob(x).flatten(1).sum(1)
        torch.testing.assert_close(step_log_prob(x, mean, std), expected)


def test_sampling_is_deterministic_with_deterministic_algorithms():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        net = make_net()
        a = sample(net, EDM(), torch.arange(2), torch.Generator().manual_seed(0), 3, "heun")
        b = sample(net, EDM(), torch.arange(2), torch.Generator().manual_seed(0), 3, "heun")
    finally:
        torch.use_deterministic_algorithms(before)
    assert torch.equal(a, b)


# ---------------------------------------------------------------- validation


def test_bad_arguments_raise_naming_allowed_values():
    net = make_net()
    labels = torch.arange(2)
    g = torch.Generator()
    with pytest.raises(ValueError, match="flow_matching, edm, ddpm"):
        make_formulation("score_sde")
    with pytest.raises(ValueError, match="euler, heun, ddim"):
        sample(net, FlowMatching(), labels, g, sampler="dpm++")
    with pytest.raises(ValueError, match="cfg_scale"):
        sample(net, FlowMatching(), labels, g, cfg_scale=-0.5)
    with pytest.raises(ValueError, match="eta"):
        sample(net, FlowMatching(), labels, g, sampler="euler", eta=0.5)
    with pytest.raises(ValueError, match="cosine, linear"):
        make_formulation("ddpm", schedule="sigmoid")
    with pytest.raises(ValueError, match="eps, v"):
        DDPM(prediction="x0")


# ---------------------------------------------------------------- guidance interval


@pytest.mark.parametrize("form", ALL_FORMS[:3], ids=lambda f: type(f).__name__)
def test_noise_fraction_runs_from_data_to_noise(form):
    times = form.timesteps(10)
    fractions = [diffusion.noise_fraction(form, float(t)) for t in times]
    assert fractions[0] > 0.95 and fractions[-1] < 0.05
    assert all(a > b for a, b in zip(fractions, fractions[1:], strict=False))
    assert diffusion.noise_fraction(FlowMatching(), 0.3) == pytest.approx(0.3)


def test_guidance_interval_guides_only_inside_it():
    form = FlowMatching()
    assert diffusion.guidance_at(form, 0.5, 3.0, (0.0, 0.6)) == 3.0
    assert diffusion.guidance_at(form, 0.7, 3.0, (0.0, 0.6)) == 1.0
    net, labels = make_net(), torch.arange(CLASSES)

    def draw(**kw) -> torch.Tensor:
        return sample(net, form, labels, torch.Generator().manual_seed(0), steps=4, **kw)

    assert torch.equal(draw(cfg_scale=3.0, interval=(0.0, 1.0)), draw(cfg_scale=3.0))
    # an interval no step falls in is unguided sampling; one in between differs from both
    assert torch.equal(draw(cfg_scale=3.0, interval=(0.0, 0.1)), draw(cfg_scale=1.0))
    part = draw(cfg_scale=3.0, interval=(0.0, 0.6))
    assert not torch.equal(part, draw(cfg_scale=1.0))
    assert not torch.equal(part, draw(cfg_scale=3.0))


def test_trajectory_guides_only_inside_the_interval():
    form, net, labels = FlowMatching(), make_net(), torch.arange(CLASSES)

    def traj(**kw):
        g = torch.Generator().manual_seed(0)
        return diffusion.sample_trajectory(net, form, labels, g, 4, eta=1.0, **kw)

    assert torch.equal(traj(cfg_scale=3.0, interval=(0.0, 0.1)).xs, traj(cfg_scale=1.0).xs)
    assert not torch.equal(traj(cfg_scale=3.0, interval=(0.0, 0.6)).xs, traj(cfg_scale=1.0).xs)


def test_rl_rescoring_guides_the_steps_that_sampling_guided():
    """The policy rescores each stored step with the guidance that step was sampled with, so
    the ratio starts at 1 when only part of the path is guided."""
    from genpipe.config import Finetune
    from genpipe.generator import Generator
    from genpipe.models.priors.diffusion import DiffusionPolicy
    from genpipe.models.tokenizer import VQAutoencoder

    torch.manual_seed(0)
    tokenizer = VQAutoencoder(1, (4, 8), 0, 4, "vq", codebook_size=8, kmeans_init=False).eval()
    net = make_net()
    sampling = {"cfg_scale": 3.0, "guidance_interval": [0.0, 0.5], "steps": 4}
    gen = Generator(tokenizer, net, "diffusion", sampling, {"name": "flow_matching"})
    cfg = Finetune(diffusion_steps=6, train_step_fraction=1.0)
    policy = DiffusionPolicy(gen, net, cfg, 3.0)
    roll = policy.rollout(torch.arange(CLASSES), torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(policy.log_prob(roll), roll.old_logp, atol=1e-3, rtol=1e-4)
