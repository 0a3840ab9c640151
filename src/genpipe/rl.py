"""GRPO-style policy-gradient pieces, as pure tensor functions (no models, no I/O).

A batch is `prompts * group_size` samples laid out group by group: rows g*G .. (g+1)*G - 1
answer the same prompt. Log-probabilities are (B,) for a whole sample (autoregressive codes)
or (B, S) for S scored steps of a sample (diffusion transitions); advantages are per sample
and broadcast over steps. A `Policy` (one per prior kind, models/priors) turns a prior into
`Rollout`s these functions score.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

ADV_EPS = 1e-4
# Log-ratios are clamped here before exp: far past any clip range, yet a diffusion step's
# log-probability (a sum over every latent dimension) can move by hundreds after one update,
# and exp would overflow into inf * 0 = NaN. A clamped term simply gets no gradient.
MAX_LOG_RATIO = 20.0


ADVANTAGES = ("grpo", "dr_grpo")


def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    mode: str = "grpo",
    std_floor: float = 0.0,
    eps: float = ADV_EPS,
) -> torch.Tensor:
    """Reward minus its group mean: each sample is judged only against samples of the same
    prompt, so no value network is needed. `grpo` then divides by max(group std, std_floor)
    + eps, so easy and hard prompts weigh the same; without a floor that scale-invariance turns
    a near-tie (seven samples at a capped reward, one a hair below) into advantages as large
    as a real failure's. `dr_grpo` (Dr. GRPO) does not divide at all: advantages keep the
    reward's own scale. A group whose rewards are all equal gets zero advantage."""
    if group_size < 2 or rewards.ndim != 1 or rewards.numel() % group_size:
        raise ValueError(
            f"rewards {tuple(rewards.shape)} must be 1-D and split into groups of {group_size} >= 2"
        )
    if mode not in ADVANTAGES:
        raise ValueError(f"advantage mode must be one of {ADVANTAGES}, got {mode!r}")
    if std_floor < 0:
        raise ValueError(f"std_floor must be >= 0, got {std_floor}")
    groups = rewards.float().view(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if mode == "dr_grpo":
        return centred.flatten()
    std = groups.std(dim=1, keepdim=True, unbiased=False).clamp(min=std_floor)
    return (centred / (std + eps)).flatten()


def _per_step(advantages: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) advantages against (B,) or (B, S) log-probabilities."""
    return advantages.reshape(-1, *([1] * (like.ndim - 1))).to(like)


def clipped_surrogate(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, clip_eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped objective, negated into a loss: -mean(min(r A, clip(r, 1-e, 1+e) A)) with
    r = exp(logp - old_logp). Returns (loss, clip fraction): the share of terms whose ratio is
    outside the trust region, which stop contributing gradient once they move the wrong way."""
    adv = _per_step(advantages, logp)
    ratio = (logp - old_logp.detach()).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO).exp()
    clipped = ratio.clamp(1 - clip_eps, 1 + clip_eps)
    loss = -torch.minimum(ratio * adv, clipped * adv).mean()
    clip_frac = ((ratio - 1).abs() > clip_eps).float().mean()
    return loss, clip_frac.detach()


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimate of KL(policy || reference) per sample (or step): r - 1 - log r with
    r = p_ref / p_policy at a sample drawn from the policy. Unbiased, always >= 0, and lower
    variance than -log r; its gradient pulls the policy back towards the reference."""
    log_r = (ref_logp.detach() - logp).clamp(max=MAX_LOG_RATIO)
    return log_r.exp() - 1 - log_r


def kl_exact(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Exact KL(policy || reference) per sample, summed over its positions, from the full
    per-position log-distributions (B, L, K) of both; the policy's may be -inf (truncated
    codes, which contribute 0). Unlike a k3 estimate at the sampled codes it has no sampling
    noise, and a policy that computes the logits for its log-prob gets it for free."""
    p = logp.exp()
    # mask -inf before the product: 0 * -inf is NaN, in the backward pass too
    finite = torch.where(p > 0, logp, torch.zeros_like(logp))
    return (p * (finite - ref_logp.detach())).sum(dim=(1, 2))


def group_diversity(images: torch.Tensor, group_size: int) -> float:
    """Mean pairwise L2 distance between the images of each group, averaged over groups: falls
    towards 0 when RL collapses a prompt onto one image (mode collapse)."""
    groups = images.detach().float().flatten(1).view(-1, group_size, images[0].numel())
    return float(torch.stack([torch.pdist(g).mean() for g in groups]).mean())


@dataclass
class Rollout:
    """One batch of samples from a policy, with what is needed to rescore it.

    old_logp / ref_logp: (B, S) log-probabilities of S scored steps under the sampling weights
    and the frozen prior; `total_steps` stochastic steps make one sample (S of them scored);
    `replay` is whatever the policy needs to score the same actions again.
    """

    labels: torch.Tensor
    images: torch.Tensor
    old_logp: torch.Tensor
    ref_logp: torch.Tensor
    replay: Any
    total_steps: int
    exact_kl: torch.Tensor | None = None  # (B,) when the policy computes it (kl_estimator)

    def _whole_sample(self, per_step: torch.Tensor) -> torch.Tensor:
        """(B, S) terms of the scored steps -> (B,) over all `total_steps`: the mean over a
        random share of the steps, scaled up, is unbiased."""
        return per_step.float().mean(dim=1) * self.total_steps

    def kl_per_sample(self) -> torch.Tensor:
        """KL(policy || prior) over a sample's whole generation, (B,): exact where the policy
        gave it, else the k3 estimate."""
        if self.exact_kl is not None:
            return self.exact_kl
        return self._whole_sample(kl_k3(self.old_logp, self.ref_logp))

    def log_ratio_per_sample(self) -> torch.Tensor:
        """log p_policy(x) - log p_prior(x) of each whole sample, (B,). Its mean under the
        policy is the KL; as a reward term its score-function gradient is the KL's whole
        gradient, including how each action changes the states that follow."""
        return self._whole_sample(self.old_logp.detach() - self.ref_logp.detach())


class Policy(Protocol):
    """A prior as an RL policy; each prior kind provides one (models/priors)."""

    net: nn.Module

    def rollout(self, labels: torch.Tensor, generator: torch.Generator) -> Rollout: ...

    def log_prob(self, rollout: Rollout) -> torch.Tensor: ...


class ExactKLPolicy(Policy, Protocol):
    """A policy that also gives the exact KL per sample to its reference, differentiable
    (`finetune.kl_estimator: exact`)."""

    def kl(self, rollout: Rollout) -> torch.Tensor: ...
