"""A user reward for bench/rl_reward_gain.py, loaded through `finetune.reward_entry_points`
as a pipeline user would (`{clean_background: "bench.rl_user_rewards:clean_background"}`)."""

from __future__ import annotations

import torch

BACKGROUND = 0.3  # pixel values below this are background, not stroke


def clean_background(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Minus the mean faint residue (pixels below BACKGROUND) per image: decoded samples carry
    more of it than real digits (default digits pipeline: 0.026 against 0.018 on the test
    split), and unlike the 8x8 PNG size it is continuous, so small moves are rewarded."""
    del labels
    x = images.detach().float().clamp(0, 1)
    return -torch.where(x < BACKGROUND, x, torch.zeros_like(x)).flatten(1).mean(1)
