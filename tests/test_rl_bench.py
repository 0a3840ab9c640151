"""The reward-gain benchmark's yardsticks (bench/rl_reward_gain.py): the ideal KL-regularised
gain it reports next to RL's, and the user rewards it is run with."""

from __future__ import annotations

import math

import pytest
import torch

from bench.rl_reward_gain import ideal
from bench.rl_user_rewards import RESIDUE_EPS, clean_background, log_clean_background


def test_ideal_tilt_of_a_gaussian_reward_gains_sqrt_2kl_stds():
    """The exponential tilt of N(0, 1) by lam is N(lam, 1), at KL lam^2 / 2."""
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(4_000, generator=g)
    labels = torch.arange(4_000) % 4
    gain, kl_for_two = ideal(rewards, labels, 0.5)
    assert gain == pytest.approx(1.0, abs=0.1)
    assert kl_for_two == pytest.approx(2.0, abs=0.3)


def test_ideal_tilt_cannot_trade_one_class_for_another():
    """A reward that differs only between classes: RL's groups compare samples of one class,
    so no reweighting within a class gains anything, and the 2-std bar is out of reach."""
    labels = torch.arange(1000) % 2
    rewards = labels.float()  # class 1 scores 1, class 0 scores 0: std 0.5
    gain, kl_for_two = ideal(rewards, labels, 1.0)
    assert gain == pytest.approx(0.0, abs=1e-6)
    assert math.isinf(kl_for_two)


def _with_background(level: float) -> torch.Tensor:
    """One 8x8 image: a bright stroke (ignored) on a background at `level`."""
    img = torch.full((1, 8, 8), level)
    img[:, :, 3:5] = 1.0
    return img


def test_log_clean_background_rewards_relative_cleaning():
    images = torch.stack([_with_background(v) for v in (0.2, 0.1, 0.02, 0.01)])
    labels = torch.zeros(4, dtype=torch.long)
    log_r, lin_r = log_clean_background(images, labels), clean_background(images, labels)
    assert (log_r.diff() > 0).all() and (lin_r.diff() > 0).all()  # cleaner scores higher
    # halving a dirty background and halving a clean one earn the same (up to the eps) ...
    dirty, clean = log_r[1] - log_r[0], log_r[3] - log_r[2]
    assert dirty == pytest.approx(math.log(2), abs=0.02)
    assert clean == pytest.approx(math.log(2), abs=0.2)
    assert clean > 0.8 * dirty
    # ... while the linear reward pays the dirty one ten times more
    assert (lin_r[1] - lin_r[0]) > 9 * (lin_r[3] - lin_r[2])
    spotless = log_clean_background(_with_background(0.0)[None], labels[:1])
    assert spotless.item() == pytest.approx(-math.log(RESIDUE_EPS))  # finite
