"""User rewards for bench/rl_reward_gain.py, loaded through `finetune.reward_entry_points`
as a pipeline user would (`{clean_background: "bench.rl_user_rewards:clean_background"}`)."""

from __future__ import annotations

import torch

BACKGROUND = 0.3  # pixel values below this are background, not stroke
RESIDUE_EPS = 1e-3  # keeps the log finite for a spotless image; ~1/20 of a sample's residue


def residue(images: torch.Tensor) -> torch.Tensor:
    """Mean faint residue (pixels below BACKGROUND) per image, (B,)."""
    x = images.detach().float().clamp(0, 1)
    return torch.where(x < BACKGROUND, x, torch.zeros_like(x)).flatten(1).mean(1)


def clean_background(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Minus the mean faint residue per image: decoded samples carry more of it than real
    digits (default digits pipeline: 0.026 against 0.018 on the test split), and unlike the
    8x8 PNG size it is continuous, so small moves are rewarded."""
    del labels
    return -residue(images)


def log_clean_background(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Minus the log of the residue: the same goal in relative terms, so halving a clean
    sample's residue earns as much as halving a dirty one's. On the prior's samples the
    residue is skewed (a tail of dirty samples), and its log is not: the linear reward's
    per-sample std is set by that tail, which a whole-distribution shift cannot move far."""
    del labels
    return -torch.log(residue(images) + RESIDUE_EPS)
