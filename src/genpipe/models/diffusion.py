"""Diffusion over continuous latents (B, D, h, w): three training formulations and one
sampling loop, for the `diffusion` prior (models/priors/diffusion.py holds its net).

Every formulation is a Gaussian path x_t = alpha(t) x0 + sigma(t) eps in its own time
variable t (rectified flow: t in [0, 1]; EDM: t = sigma; DDPM: variance-preserving t in
[0, 1]). It says how to train the net and how to turn the net's raw output into a data
estimate x0_hat and a noise estimate eps_hat. Samplers only ever see (alpha, sigma, their
time derivatives, x0_hat, eps_hat), so each sampler works with each formulation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from genpipe.models.priors.diffusion import Denoiser

FORMULATIONS = ("flow_matching", "edm", "ddpm")
SAMPLERS = ("euler", "heun", "ddim")
SCHEDULES = ("cosine", "linear")
PREDICTIONS = ("eps", "v")


# ---------------------------------------------------------------- training targets


def flow_matching_target(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Velocity of x_t = (1 - t) x0 + t eps: d x_t / dt = eps - x0 (independent of t)."""
    del t
    return eps - x0


def edm_precond(sigma: torch.Tensor, sigma_data: float):
    """EDM (Karras et al. 2022, table 1) coefficients (c_skip, c_out, c_in, c_noise) at sigma:
    D(x) = c_skip x + c_out F(c_in x, c_noise) keeps F's input and target at unit variance."""
    norm = (sigma**2 + sigma_data**2).sqrt()
    return sigma_data**2 / norm**2, sigma * sigma_data / norm, 1 / norm, sigma.log() / 4


def edm_target(
    x0: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor, sigma_data: float
) -> torch.Tensor:
    """What F should output so that D(x0 + sigma eps) = x0: (x0 - c_skip x) / c_out. Unit-weight
    MSE on it equals EDM's lambda(sigma)-weighted loss on D."""
    c_skip, c_out, _, _ = edm_precond(sigma, sigma_data)
    return (x0 - c_skip * (x0 + sigma * eps)) / c_out


def ddpm_target(
    x0: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, prediction: str
) -> torch.Tensor:
    """eps, or v = alpha eps - sigma x0 (Salimans & Ho 2022), for x_t = alpha x0 + sigma eps."""
    _check_choice("prediction", prediction, PREDICTIONS)
    return eps if prediction == "eps" else alpha * eps - sigma * x0


def vp_alpha_sigma(t: torch.Tensor, schedule: str, cosine_s: float = 0.008):
    """Variance-preserving schedule in continuous t in [0, 1]: (alpha, sigma, dalpha/dt,
    dsigma/dt) with alpha^2 + sigma^2 = 1.

    cosine: alpha = cos(pi/2 (t+s)/(1+s)) / cos(pi/2 s/(1+s)) (Nichol & Dhariwal 2021);
    linear: the continuous limit of DDPM's linear betas 1e-4..0.02 over 1000 steps,
    beta(t) = 0.1 + 19.9 t, log alpha^2 = -(0.1 t + 9.95 t^2) (Song et al. 2021).
    """
    _check_choice("schedule", schedule, SCHEDULES)
    if schedule == "cosine":
        rate = math.pi / 2 / (1 + cosine_s)
        norm = math.cos(rate * cosine_s)
        alpha = torch.cos(rate * (t + cosine_s)) / norm
        dalpha = -torch.sin(rate * (t + cosine_s)) * rate / norm
        sigma = (1 - alpha**2).clamp(min=0).sqrt()
    else:
        beta = 0.1 + 19.9 * t
        log_alpha2 = -(0.1 * t + 9.95 * t**2)
        alpha = (0.5 * log_alpha2).exp()
        dalpha = -0.5 * beta * alpha
        sigma = (-torch.expm1(log_alpha2)).sqrt()
    return alpha, sigma, dalpha, -alpha * dalpha / sigma


# ---------------------------------------------------------------- formulations


def _randn(shape, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Gaussian noise drawn on the generator's device, then moved: a CPU generator gives the same
    numbers whatever device the model runs on."""
    return torch.randn(shape, generator=generator, device=generator.device).to(device)


def _bc(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, ...) to broadcast against x."""
    return t.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)


class Formulation:
    """A Gaussian path x_t = alpha(t) x0 + sigma(t) eps and a parameterisation of the net on it.

    Subclasses define the schedule, the training-time distribution, the net's input scaling,
    its regression target and how its output maps to (x0_hat, eps_hat).
    """

    name: str

    def schedule(self, t: torch.Tensor):
        """(alpha, sigma, dalpha/dt, dsigma/dt) at times t."""
        raise NotImplementedError

    def timesteps(self, steps: int) -> torch.Tensor:
        """steps + 1 sampling times, from the noise end to the data end (sigma = 0)."""
        raise NotImplementedError

    def train_time(self, n: int, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def c_noise(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def c_in(self, t: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(t)

    def target(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def estimates(self, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor):
        """Net output at (x, t) -> (x0_hat, eps_hat)."""
        raise NotImplementedError

    def ode_coords(self, t: float) -> tuple[float, float]:
        """(scale S, ODE time tau) of the coordinates y = x / S in which euler and heun
        integrate dy/dtau. Default: x itself against t."""
        return 1.0, t

    def ode_derivative(self, x0_hat: torch.Tensor, eps_hat: torch.Tensor, t: float):
        """dy/dtau at t. Default: the path's velocity dalpha/dt x0_hat + dsigma/dt eps_hat."""
        _, _, dalpha, dsigma = _coeffs(self, t)
        return dalpha * x0_hat + dsigma * eps_hat

    def loss(
        self, net: Denoiser, x0: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        """Mean squared error of the net against this formulation's target at a random time;
        labels are dropped to the null class with the net's class_dropout when training."""
        return self.sample_losses(net, x0, labels, generator).mean()

    def sample_losses(
        self, net: Denoiser, x0: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        """`loss` per sample (B,): weighted by rewards it fits the reward-tilted marginal that
        the ODE sampler then draws (bench/rl_reward_weighted.py)."""
        t = self.train_time(x0.shape[0], generator).to(x0.device)
        eps = _randn(x0.shape, generator, x0.device)
        alpha, sigma, _, _ = self.schedule(t)
        x_t = _bc(alpha, x0) * x0 + _bc(sigma, x0) * eps
        drop = net.drop_labels(labels, generator) if net.training else None
        out = net(_bc(self.c_in(t), x0) * x_t, self.c_noise(t), labels, drop)
        return (out.float() - self.target(x0, eps, t).float()).square().flatten(1).mean(1)


class FlowMatching(Formulation):
    """Rectified flow: x_t = (1 - t) x0 + t eps, the net predicts the velocity eps - x0."""

    name = "flow_matching"

    def schedule(self, t):
        return 1 - t, t, -torch.ones_like(t), torch.ones_like(t)

    def timesteps(self, steps):
        return torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)

    def train_time(self, n, generator):
        return torch.rand(n, generator=generator, device=generator.device)

    def target(self, x0, eps, t):
        return flow_matching_target(x0, eps, t)

    def estimates(self, out, x, t):
        t = _bc(t, x)
        return x - t * out, x + (1 - t) * out


class EDM(Formulation):
    """Karras et al. 2022: x = x0 + sigma eps, preconditioned denoiser, log-normal sigma.

    sigma_data is the data's standard deviation: 1 for latents standardised to unit variance
    (EDM's 0.5 is for images in [-1, 1]); p_mean is EDM's -1.2 shifted by ln(1 / 0.5) to match,
    which lifted class consistency from 0.76 to 0.99 on the digits stand-in.
    """

    name = "edm"

    def __init__(
        self,
        sigma_data: float = 1.0,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        rho: float = 7.0,
        p_mean: float = -0.5,
        p_std: float = 1.2,
    ) -> None:
        if not 0 < sigma_min < sigma_max or sigma_data <= 0 or p_std <= 0:
            raise ValueError("edm needs 0 < sigma_min < sigma_max, sigma_data > 0, p_std > 0")
        self.sigma_data, self.rho = sigma_data, rho
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self.p_mean, self.p_std = p_mean, p_std

    def schedule(self, t):
        return torch.ones_like(t), t, torch.zeros_like(t), torch.ones_like(t)

    def timesteps(self, steps):
        """Karras rho-spaced sigmas from sigma_max to sigma_min, then 0."""
        ramp = torch.linspace(0, 1, steps, dtype=torch.float64) if steps > 1 else torch.zeros(1)
        lo, hi = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
        sigmas = (hi + ramp.double() * (lo - hi)) ** self.rho
        return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])

    def train_time(self, n, generator):
        z = torch.randn(n, generator=generator, device=generator.device)
        return (self.p_mean + self.p_std * z).exp()

    def c_noise(self, t):
        return edm_precond(t, self.sigma_data)[3]

    def c_in(self, t):
        return edm_precond(t, self.sigma_data)[2]

    def target(self, x0, eps, t):
        return edm_target(x0, eps, _bc(t, x0), self.sigma_data)

    def estimates(self, out, x, t):
        sigma = _bc(t, x)
        c_skip, c_out, _, _ = edm_precond(sigma, self.sigma_data)
        x0_hat = c_skip * x + c_out * out
        return x0_hat, (x - x0_hat) / sigma


class DDPM(Formulation):
    """Variance-preserving diffusion in continuous time, predicting eps or v.

    The cosine schedule reaches alpha = 0 at t = 1, so its path stops at t_max = 0.999
    (alpha ~ 1.6e-3); eps-prediction is still ill-conditioned there (x0_hat divides by
    alpha), which is why v is the default.
    """

    name = "ddpm"

    def __init__(self, schedule: str = "cosine", prediction: str = "v") -> None:
        _check_choice("schedule", schedule, SCHEDULES)
        _check_choice("prediction", prediction, PREDICTIONS)
        self.schedule_name, self.prediction = schedule, prediction
        self.t_max = 0.999 if schedule == "cosine" else 1.0

    def schedule(self, t):
        return vp_alpha_sigma(t, self.schedule_name)

    def timesteps(self, steps):
        return torch.linspace(self.t_max, 0.0, steps + 1, dtype=torch.float64)

    def ode_coords(self, t):
        """y = x / alpha against tau = sigma / alpha (EDM's form of the VP ODE): dy/dtau is
        eps_hat, smooth down to t = 0, where dsigma/dt is singular."""
        alpha, sigma, _, _ = _coeffs(self, t)
        return alpha, sigma / alpha

    def ode_derivative(self, x0_hat, eps_hat, t):
        return eps_hat

    def train_time(self, n, generator):
        return self.t_max * torch.rand(n, generator=generator, device=generator.device)

    def target(self, x0, eps, t):
        alpha, sigma, _, _ = self.schedule(t)
        return ddpm_target(x0, eps, _bc(alpha, x0), _bc(sigma, x0), self.prediction)

    def estimates(self, out, x, t):
        alpha, sigma, _, _ = self.schedule(t)
        alpha, sigma = _bc(alpha, x), _bc(sigma, x)
        if self.prediction == "eps":
            return (x - sigma * out) / alpha, out
        return alpha * x - sigma * out, sigma * x + alpha * out


def make_formulation(name: str, **kwargs) -> Formulation:
    """Formulation by name; kwargs go to its constructor (EDM sigmas, DDPM schedule...)."""
    _check_choice("formulation", name, FORMULATIONS)
    return {"flow_matching": FlowMatching, "edm": EDM, "ddpm": DDPM}[name](**kwargs)


# ---------------------------------------------------------------- sampling


def denoise(
    net: Denoiser,
    form: Formulation,
    x: torch.Tensor,
    t: float | torch.Tensor,
    labels: torch.Tensor,
    cfg_scale: float = 1.0,
):
    """(x0_hat, eps_hat) at (x, t) with classifier-free guidance on the net's output.

    Conditional and unconditional rows run as one batch of 2B; at cfg_scale == 1 only the
    conditional rows run, so guidance at 1 is exactly conditional sampling.
    """
    b = x.shape[0]
    t = torch.as_tensor(t, dtype=torch.float32, device=x.device).expand(b)
    x_in = _bc(form.c_in(t), x) * x
    if cfg_scale == 1.0:
        out = net(x_in, form.c_noise(t), labels).float()
    else:
        drop = torch.arange(2 * b, device=x.device) >= b
        both = net(x_in.repeat(2, 1, 1, 1), form.c_noise(t).repeat(2), labels.repeat(2), drop)
        cond, uncond = both.float().chunk(2)
        out = uncond + cfg_scale * (cond - uncond)
    return form.estimates(out, x.float(), t)


def noise_fraction(form: Formulation, t: float) -> float:
    """sigma / (alpha + sigma) at time t: 0 at data, 1 at pure noise, and equal to t for flow
    matching; a noise level that reads the same in every formulation."""
    alpha, sigma, _, _ = _coeffs(form, t)
    return sigma / (alpha + sigma)


def guidance_at(
    form: Formulation, t: float, cfg_scale: float, interval: tuple[float, float] = (0.0, 1.0)
) -> float:
    """The guidance scale at time t: `cfg_scale` where the noise fraction lies in `interval`,
    1 (no guidance) elsewhere. Guiding only part of the path (Kynkaanniemi et al. 2024)
    keeps the class pull without collapsing the samples' diversity."""
    lo, hi = interval
    return cfg_scale if lo <= noise_fraction(form, t) <= hi else 1.0


def _coeffs(form: Formulation, t: float) -> tuple[float, float, float, float]:
    """(alpha, sigma, dalpha/dt, dsigma/dt) at one time, as Python floats (float64 math)."""
    alpha, sigma, dalpha, dsigma = form.schedule(torch.tensor(t, dtype=torch.float64))
    return float(alpha), float(sigma), float(dalpha), float(dsigma)


def ode_derivative(net, form, x, t, labels, cfg_scale) -> torch.Tensor:
    """d y / d tau of the probability-flow ODE at (x, t), in the formulation's `ode_coords`."""
    x0_hat, eps_hat = denoise(net, form, x, t, labels, cfg_scale)
    return form.ode_derivative(x0_hat, eps_hat, t)


def ddim_step(
    net: Denoiser,
    form: Formulation,
    x: torch.Tensor,
    t: float,
    s: float,
    labels: torch.Tensor,
    cfg_scale: float = 1.0,
    eta: float = 0.0,
) -> tuple[torch.Tensor, float]:
    """Gaussian transition x_t -> x_s (s < t): (mean, std) with x_s = mean + std * z.

    std^2 = eta^2 * posterior variance of q(x_s | x_t, x0); eta = 0 is deterministic DDIM, eta
    = 1 is ancestral sampling. RL recomputes this mean under the current weights to score a
    stored transition with `step_log_prob`.
    """
    x0_hat, eps_hat = denoise(net, form, x, t, labels, cfg_scale)
    a_t, s_t, _, _ = _coeffs(form, t)
    a_s, s_s, _, _ = _coeffs(form, s)
    ratio = (a_t * s_s) / (a_s * s_t)
    std = eta * s_s * math.sqrt(max(0.0, 1 - ratio**2))
    mean = a_s * x0_hat + math.sqrt(max(0.0, s_s**2 - std**2)) * eps_hat
    return mean, std


def step_log_prob(
    x_next: torch.Tensor, mean: torch.Tensor, std: float | torch.Tensor
) -> torch.Tensor:
    """log N(x_next; mean, std^2 I) summed over all but the batch dim -> (B,)."""
    std = torch.as_tensor(std, dtype=mean.dtype, device=mean.device)
    z = (x_next - mean) / std
    logp = -0.5 * z**2 - std.log() - 0.5 * math.log(2 * math.pi)
    return logp.flatten(1).sum(dim=1)


@dataclass
class Trajectory:
    """A stochastic DDIM run: xs[0] is the start noise, xs[i + 1] = means[i] + stds[i] * z_i.
    Steps with std 0 (the last one always) are deterministic and carry no log-probability."""

    times: torch.Tensor  # (steps + 1,)
    xs: torch.Tensor  # (steps + 1, B, D, h, w)
    means: torch.Tensor  # (steps, B, D, h, w)
    stds: torch.Tensor  # (steps,)


def _check_sample_args(sampler: str, steps: int, cfg_scale: float, eta: float) -> None:
    _check_choice("sampler", sampler, SAMPLERS)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if cfg_scale < 0:
        raise ValueError(f"cfg_scale must be >= 0, got {cfg_scale}")
    if eta < 0 or (eta > 0 and sampler != "ddim"):
        raise ValueError(f"eta must be >= 0 and only the ddim sampler takes eta > 0, got {eta}")


def _start(net: Denoiser, form: Formulation, labels, generator, times) -> torch.Tensor:
    """Pure noise at the first time: sigma(t_0) * z (alpha(t_0) x0 is ~0 or << sigma there)."""
    _, sigma, _, _ = form.schedule(times[:1])
    shape = (labels.shape[0], *net.latent_shape)
    return float(sigma) * _randn(shape, generator, labels.device)


@torch.no_grad()
def sample(
    net: Denoiser,
    form: Formulation,
    labels: torch.Tensor,
    generator: torch.Generator,
    steps: int = 20,
    sampler: str = "euler",
    cfg_scale: float = 1.0,
    eta: float = 0.0,
    interval: tuple[float, float] = (0.0, 1.0),
) -> torch.Tensor:
    """Latents (B, D, h, w) for `labels` (B,) with `steps` steps of `sampler`, guided by
    `cfg_scale` only inside `interval` (see `guidance_at`).

    euler / heun integrate the probability-flow ODE (`integrate_ode`); ddim takes `eta` for
    stochastic steps. Function evaluations: steps (euler, ddim), 2 * steps - 1 (heun); each on
    2B rows under CFG.
    """
    _check_sample_args(sampler, steps, cfg_scale, eta)
    if sampler == "ddim":
        traj = sample_trajectory(net, form, labels, generator, steps, cfg_scale, eta, interval)
        return traj.xs[-1]
    return integrate_ode(net, form, labels, generator, steps, sampler, cfg_scale, interval)[0]


@dataclass
class OdeStep:
    """One step of `integrate_ode` run with autograd on: its state, times, guidance and ODE
    derivative (what a reward-gradient fine-tune penalises the drift of)."""

    x: torch.Tensor
    t: float
    s: float
    guidance: float
    derivative: torch.Tensor


def integrate_ode(
    net: Denoiser,
    form: Formulation,
    labels: torch.Tensor,
    generator: torch.Generator,
    steps: int = 20,
    sampler: str = "euler",
    cfg_scale: float = 1.0,
    interval: tuple[float, float] = (0.0, 1.0),
    grad_steps: int = 0,
) -> tuple[torch.Tensor, list[OdeStep]]:
    """The probability-flow ODE from noise to latents (B, D, h, w), in each formulation's
    `ode_coords` (flow: x against t; EDM: x against sigma; DDPM: x / alpha against sigma /
    alpha), where one Euler step is exactly one deterministic DDIM step; heun adds a
    second-order correction (the last step plain Euler, as in EDM).

    The last `grad_steps` steps run with autograd as the caller has it (the rest never keep a
    graph), so a reward of the result can be backpropagated through the sampler as served
    (DRaFT-K); those steps are returned, the rest are not.
    """
    times = form.timesteps(steps)
    x = _start(net, form, labels, generator, times)
    graded: list[OdeStep] = []
    for i in range(steps):
        t, s = float(times[i]), float(times[i + 1])
        tracked = i >= steps - grad_steps
        with torch.set_grad_enabled(tracked and torch.is_grad_enabled()):
            (scale_t, tau_t), (scale_s, tau_s) = form.ode_coords(t), form.ode_coords(s)
            y = x / scale_t
            guided = guidance_at(form, t, cfg_scale, interval)
            d = ode_derivative(net, form, x, t, labels, guided)
            y_next = y + (tau_s - tau_t) * d
            if sampler == "heun" and i < steps - 1:
                guided_s = guidance_at(form, s, cfg_scale, interval)
                d_next = ode_derivative(net, form, scale_s * y_next, s, labels, guided_s)
                y_next = y + (tau_s - tau_t) * 0.5 * (d + d_next)
            if tracked:
                graded.append(OdeStep(x, t, s, guided, d))
            x = scale_s * y_next
    return x, graded


@torch.no_grad()
def sample_trajectory(
    net: Denoiser,
    form: Formulation,
    labels: torch.Tensor,
    generator: torch.Generator,
    steps: int = 20,
    cfg_scale: float = 1.0,
    eta: float = 1.0,
    interval: tuple[float, float] = (0.0, 1.0),
) -> Trajectory:
    """DDIM sampling that keeps every state and each step's Gaussian mean and std, for RL;
    guided by `cfg_scale` inside `interval` (see `guidance_at`)."""
    _check_sample_args("ddim", steps, cfg_scale, eta)
    times = form.timesteps(steps)
    x = _start(net, form, labels, generator, times)
    xs, means, stds = [x], [], []
    for i in range(steps):
        t, s = float(times[i]), float(times[i + 1])
        guided = guidance_at(form, t, cfg_scale, interval)
        mean, std = ddim_step(net, form, x, t, s, labels, guided, eta)
        x = mean + std * _randn(mean.shape, generator, mean.device) if std > 0 else mean
        xs.append(x)
        means.append(mean)
        stds.append(std)
    return Trajectory(times, torch.stack(xs), torch.stack(means), torch.tensor(stds))


def _check_choice(what: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; allowed: {', '.join(allowed)}")
