"""Kind `diffusion`: a small DiT denoiser over the codes' embeddings, standardised over the
training codes, trained and sampled with a formulation of genpipe.models.diffusion; samples
are snapped back to the nearest codes; RL scores a random share of the Gaussian steps of
stochastic DDIM.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from genpipe.models.diffusion import (
    Trajectory,
    ddim_step,
    guidance_at,
    make_formulation,
    sample,
    sample_trajectory,
    step_log_prob,
)
from genpipe.models.priors.base import (
    RNG,
    CodeSpace,
    Metrics,
    PriorFileError,
    PriorKind,
    Settings,
    Tensor,
    transformer_arch,
)
from genpipe.models.priors.transformer import ClassConditional, check_arch
from genpipe.rl import Rollout

if TYPE_CHECKING:
    from genpipe.config import Finetune, Prior
    from genpipe.generator import Generator
    from genpipe.models.tokenizer import VQAutoencoder


# ---------------------------------------------------------------- denoiser network


def timestep_embedding(c_noise: torch.Tensor, dim: int, max_period: float = 10000.0):
    """Sinusoidal features (B, dim) of the noise level, scaled by 1000 so that levels in
    [0, 1] span the frequencies from 1000 rad down to 1/max_period."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=c_noise.device) / half)
    angles = 1000.0 * c_noise.float()[:, None] * freqs
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


class DiTBlock(nn.Module):
    """Bidirectional transformer block; time+class condition enters through adaLN-Zero
    (per-sample shift, scale and a residual gate that starts at zero, so each block starts as
    the identity)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim, elementwise_affine=False)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.modulation = nn.Linear(dim, 6 * dim)
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, n, d))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(cond)[:, None].chunk(6, -1)
        x = x + gate1 * self.attention(self.ln1(x) * (1 + scale1) + shift1)
        return x + gate2 * self.mlp(self.ln2(x) * (1 + scale2) + shift2)


class Denoiser(ClassConditional):
    """net(x, c_noise, labels) -> same shape as x: a small DiT over the h*w latent cells.

    `c_noise` (B,) is the formulation's noise-level input; label index `num_classes` is the
    null class used under class dropout and for the unconditional half of CFG.
    """

    def __init__(
        self,
        latent_dim: int,
        grid: tuple[int, int],
        num_classes: int,
        dim: int,
        depth: int,
        heads: int,
        class_dropout: float = 0.1,
    ) -> None:
        super().__init__()
        check_arch(dim, heads, class_dropout)
        self.latent_shape = (latent_dim, *grid)
        self.num_classes, self.class_dropout = num_classes, class_dropout
        self.freq_dim = 128
        self.embed = nn.Linear(latent_dim, dim)
        self.pos_emb = nn.Embedding(grid[0] * grid[1], dim)
        nn.init.normal_(self.pos_emb.weight, std=0.02)
        self.time_mlp = nn.Sequential(nn.Linear(self.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.class_emb = nn.Embedding(num_classes + 1, dim)
        nn.init.normal_(self.class_emb.weight, std=0.02)
        self.blocks = nn.ModuleList(DiTBlock(dim, heads) for _ in range(depth))
        self.ln_out = nn.LayerNorm(dim, elementwise_affine=False)
        self.out_modulation = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, latent_dim)
        for layer in (self.out_modulation, self.out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(
        self,
        x: torch.Tensor,
        c_noise: torch.Tensor,
        labels: torch.Tensor,
        drop_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        b, d, h, w = x.shape
        temb = self.time_mlp(timestep_embedding(c_noise, self.freq_dim).to(x.dtype))
        cond = F.silu(temb + self.class_emb(self.with_null(labels, drop_mask)))
        tokens = self.embed(x.flatten(2).transpose(1, 2)) + self.pos_emb.weight
        for block in self.blocks:
            tokens = block(tokens, cond)
        shift, scale = self.out_modulation(cond)[:, None].chunk(2, -1)
        out = self.out(self.ln_out(tokens) * (1 + scale) + shift)
        return out.transpose(1, 2).reshape(b, d, h, w)


# ---------------------------------------------------------------- the kind


def from_prior_space(sampling: dict[str, Any], latents: torch.Tensor) -> torch.Tensor:
    """Undo the normalisation the prior was trained in (recorded in its sampling settings)."""
    return latents * sampling.get("latent_scale", 1.0) + sampling.get("latent_shift", 0.0)


class DiffusionKind(PriorKind):
    name = "diffusion"
    module = Denoiser
    cfg_scale = 1.25

    def from_params(self, cfg: Prior, space: CodeSpace) -> dict[str, Any]:
        return {
            "latent_dim": space.latent_dim,
            **transformer_arch(cfg, space),
            "class_dropout": cfg.class_dropout,
        }

    def sampling(self, cfg: Prior) -> dict[str, Any]:
        return {
            "cfg_scale": self.guidance(cfg),
            "guidance_interval": list(cfg.guidance_interval),
            "sampler": cfg.sampler,
            "steps": cfg.sampling_steps,
            "eta": cfg.eta,
        }

    def settings(self, cfg: Prior) -> dict[str, Any]:
        """The formulation, by name and constructor arguments."""
        return {
            "name": cfg.formulation,
            **({"prediction": cfg.prediction} if cfg.formulation == "ddpm" else {}),
        }

    def calibrate(self, tokenizer: VQAutoencoder, train_codes: torch.Tensor) -> dict[str, Any]:
        with torch.no_grad():
            latents = tokenizer.codes_to_latent(train_codes)
        return {"latent_shift": float(latents.mean()), "latent_scale": float(latents.std())}

    def inputs(self, tokenizer: VQAutoencoder, codes: Tensor, sampling: dict[str, Any]) -> Tensor:
        with torch.no_grad():
            latents = tokenizer.codes_to_latent(codes)
        return (latents - sampling["latent_shift"]) / sampling["latent_scale"]

    def loss(self, net: nn.Module, settings: Settings, x: Tensor, y: Tensor, rng: RNG) -> Tensor:
        return make_formulation(**(settings or {})).loss(net, x, y, rng)  # type: ignore[arg-type]

    def sample_losses(
        self, net: nn.Module, settings: Settings, x: Tensor, y: Tensor, rng: RNG
    ) -> Tensor:
        """The training loss per sample (B,); weighted, a reward-weighted fit."""
        assert isinstance(net, Denoiser)
        return make_formulation(**(settings or {})).sample_losses(net, x, y, rng)

    def validate(
        self, net: nn.Module, settings: Settings, x: Tensor, y: Tensor, seed: int
    ) -> Metrics:
        """The training loss at fixed noise draws."""
        form = make_formulation(**(settings or {}))
        g = torch.Generator(x.device).manual_seed(seed + 1)
        losses = [float(form.loss(net, x, y, g)) for _ in range(8)]  # type: ignore[arg-type]
        return {"val_loss": sum(losses) / len(losses)}

    def sample_codes(self, gen: Generator, labels: Tensor, rng: RNG, **s: Any) -> Tensor:
        assert isinstance(gen.prior, Denoiser) and gen.formulation is not None
        latents = sample(
            gen.prior,
            make_formulation(**gen.formulation),
            labels,
            rng,
            steps=s.get("steps", 20),
            sampler=s.get("sampler", "euler"),
            cfg_scale=s.get("cfg_scale", 1.0),
            eta=s.get("eta", 0.0),
            interval=tuple(s.get("guidance_interval", (0.0, 1.0))),
        )
        return gen.tokenizer.latent_to_codes(from_prior_space(gen.sampling, latents))

    def check_compatible(self, tokenizer: VQAutoencoder, prior: nn.Module, path: Path) -> None:
        assert isinstance(prior, Denoiser)
        if prior.latent_shape[0] != tokenizer.latent_dim:
            raise PriorFileError(
                f"{path}: prior latents have {prior.latent_shape[0]} channels but the "
                f"tokenizer's have {tokenizer.latent_dim}; re-run `dvc repro prior`"
            )

    def policy(
        self, gen: Generator, reference: nn.Module, cfg: Finetune, cfg_scale: float
    ) -> DiffusionPolicy:
        return DiffusionPolicy(gen, reference, cfg, cfg_scale)


class DiffusionPolicy:
    """The denoiser as a policy over stochastic DDIM: each step is a Gaussian action; a random
    `train_step_fraction` of the steps is scored per batch, to save compute (as in DDPO)."""

    def __init__(
        self, gen: Generator, reference: nn.Module, cfg: Finetune, cfg_scale: float
    ) -> None:
        assert isinstance(gen.prior, Denoiser) and gen.formulation is not None
        self.gen, self.net, self.reference = gen, gen.prior, reference
        self.form = make_formulation(**gen.formulation)
        self.cfg, self.cfg_scale = cfg, cfg_scale
        self.interval = tuple(gen.sampling.get("guidance_interval", (0.0, 1.0)))

    def _log_prob(
        self, net: nn.Module, traj: Trajectory, picks: torch.Tensor, labels
    ) -> torch.Tensor:
        cols = []
        for i in picks.tolist():
            t, s = float(traj.times[i]), float(traj.times[i + 1])
            mean, std = ddim_step(
                net,  # type: ignore[arg-type]
                self.form,
                traj.xs[i],
                t,
                s,
                labels,
                guidance_at(self.form, t, self.cfg_scale, self.interval),
                self.cfg.diffusion_eta,
            )
            cols.append(step_log_prob(traj.xs[i + 1], mean, std))
        return torch.stack(cols, dim=1)

    def rollout(self, labels: torch.Tensor, generator: torch.Generator) -> Rollout:
        cfg = self.cfg
        traj = sample_trajectory(
            self.net,
            self.form,
            labels,
            generator,
            cfg.diffusion_steps,
            self.cfg_scale,
            cfg.diffusion_eta,
            self.interval,
        )
        stochastic = torch.nonzero(traj.stds > 0).flatten()
        k = max(1, round(cfg.train_step_fraction * len(stochastic)))
        picks = stochastic[torch.randperm(len(stochastic), generator=generator)[:k]].sort().values
        with torch.no_grad():
            scored = [(traj.xs[i + 1], traj.means[i], traj.stds[i]) for i in picks]
            old = torch.stack([step_log_prob(*step) for step in scored], dim=1)
            ref = self._log_prob(self.reference, traj, picks, labels)
            tokenizer = self.gen.tokenizer
            codes = tokenizer.latent_to_codes(from_prior_space(self.gen.sampling, traj.xs[-1]))
            images = tokenizer.decode_codes(codes)
        return Rollout(labels, images, old, ref, (traj, picks), len(stochastic))

    def log_prob(self, rollout: Rollout) -> torch.Tensor:
        traj, picks = rollout.replay
        return self._log_prob(self.net, traj, picks, rollout.labels)


KIND = DiffusionKind()
