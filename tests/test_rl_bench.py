"""The reward-gain benchmarks' yardsticks (bench/rl_reward_gain.py, bench/rl_tilt_headroom.py):
the ideal KL-regularised gain reported next to RL's, the weighted FID that prices it, and the
user rewards they are run with."""

from __future__ import annotations

import math

import pytest
import torch

from bench.rl_reward_gain import BarCheck, bar_intervals, curve_point, curve_printer, ideal
from bench.rl_tilt_headroom import (
    Samples,
    effective_size,
    price,
    shuffle_within,
    weighted_fid,
    weighted_gaussian_stats,
)
from bench.rl_user_rewards import (
    RESIDUE_EPS,
    SPREAD_FLOOR,
    centred,
    clean_background,
    crisp,
    group_spread,
    ink,
    log_clean_background,
    size,
    smooth,
    thin,
    upright,
)
from genpipe import evaluation


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


def _row(step: int, reward: float, kl: float) -> dict[str, float]:
    """A training row as finetune.train emits it, the bar's reward term named `realism`."""
    return {"step": step, "kl": kl, "reward_realism": reward, "reward_mean": 99.0}


def test_curve_point_reads_the_window_of_the_named_term_against_the_ideal():
    """RL at +1 std for KL 0.5 beyond step 0, on a Gaussian reward: the tilt's gain at KL 0.5
    is sqrt(2 * 0.5) = 1 std, so RL's share is ~100%. The window's mean (not its last row)
    counts, the KL at step 0 (ar's truncation cost) is taken off, and the bar's term, not
    RL's whole reward, is read."""
    g = torch.Generator().manual_seed(0)
    rewards = 2.0 + 3.0 * torch.randn(4_000, generator=g)
    labels = torch.arange(4_000) % 4
    mean, std = float(rewards.mean()), float(rewards.std())
    kl0 = 0.8
    recent = [_row(7, mean, kl0 + 0.3), _row(8, mean + 2 * std, kl0 + 0.7)]
    point = curve_point(recent, "realism", kl0, rewards, labels)
    assert point["step"] == 8
    assert point["gain"] == pytest.approx(1.0, abs=1e-6)
    assert point["kl"] == pytest.approx(0.5, abs=1e-6)
    assert point["ideal_gain"] == pytest.approx(1.0, abs=0.1)
    assert point["share"] == pytest.approx(1.0, abs=0.1)
    at_start = curve_point([_row(0, mean + 0.1 * std, kl0)], "realism", kl0, rewards, labels)
    assert math.isnan(at_start["share"])  # no KL spent, no ideal gain to share


def test_curve_printer_writes_a_point_every_n_steps(tmp_path, capsys):
    rewards = torch.linspace(-1, 1, 100)
    labels = torch.zeros(100, dtype=torch.long)
    out = tmp_path / "curve.csv"
    sink = curve_printer(3, 2, "realism", rewards, labels, out)
    for step in range(8):
        sink(_row(step, 0.1 * step, 1.0 + 0.1 * step))
    lines = out.read_text().splitlines()
    assert lines[0] == "step,gain,kl,ideal_gain,share"
    assert [float(line.split(",")[0]) for line in lines[1:]] == [0, 3, 6]
    # step 6's window is steps 5 and 6: KL (1.5 + 1.6) / 2 less step 0's 1.0
    assert float(lines[3].split(",")[2]) == pytest.approx(0.55, abs=1e-5)
    assert capsys.readouterr().out.count("curve step") == 3


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


def test_log_clean_background_is_differentiable_in_the_faint_pixels():
    """d/dx -log(residue + eps) = -1 / (N (residue + eps)) at pixels below the background
    threshold, 0 at stroke pixels: what a reward-gradient fine-tune follows."""
    image = torch.tensor([[[0.1, 0.2], [0.9, 0.05]]]).requires_grad_(True)
    log_clean_background(image[None], torch.zeros(1, dtype=torch.long)).sum().backward()
    res = (0.1 + 0.2 + 0.05) / 4
    faint = -1 / (4 * (res + RESIDUE_EPS))
    torch.testing.assert_close(image.grad, torch.tensor([[[faint, faint], [0.0, faint]]]))


def _whitened(n: int, d: int, g: torch.Generator) -> torch.Tensor:
    """n points whose sample mean is exactly 0 and unbiased covariance exactly the identity."""
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    x = x - x.mean(0)
    chol = torch.linalg.cholesky(x.t() @ x / (n - 1))
    return x @ torch.linalg.inv(chol).t()


def test_equal_weights_give_the_unweighted_fid():
    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(300, 4, generator=g), torch.randn(200, 4, generator=g) + 0.3
    uniform = torch.full((200,), 1 / 200, dtype=torch.float64)
    assert weighted_fid(real, fake, uniform) == pytest.approx(
        evaluation.fid_from_features(real, fake), rel=1e-9
    )


def test_weighted_fid_of_a_tilted_gaussian_is_the_shift_squared():
    """Samples of N(0, I) weighted by exp(lam x_1) stand for N(lam e_1, I): its Frechet
    distance to N(0, I) is lam^2 (the means alone), where the unweighted FID is 0."""
    g = torch.Generator().manual_seed(0)
    real = _whitened(2_000, 3, g)
    fake = torch.randn(40_000, 3, generator=g, dtype=torch.float64)
    lam = 0.8
    w = torch.softmax(lam * fake[:, 0], 0)
    mu, cov = weighted_gaussian_stats(fake, w)
    assert mu.tolist() == pytest.approx([lam, 0, 0], abs=0.03)
    assert cov.diagonal().tolist() == pytest.approx([1, 1, 1], abs=0.05)
    assert weighted_fid(real, fake, w) == pytest.approx(lam**2, abs=0.05)
    assert effective_size(w) == pytest.approx(40_000 * math.exp(-(lam**2)), rel=0.05)


def test_blind_shuffles_take_out_the_fid_of_fewer_effective_samples():
    """A reward unrelated to the features: its tilt leaves the distribution as it was, yet the
    weighted FID reads higher on fewer effective samples; the reward-blind shuffles of the same
    weights measure that, so the corrected ratio is about 1 where the raw one is not. A reward
    that is a feature moves the features, and the corrected ratio sees it."""
    g = torch.Generator().manual_seed(0)
    n, d = 1_000, 32
    labels = torch.arange(n) % 10
    real, fake = torch.randn(300, d, generator=g), torch.randn(n, d, generator=g) + 0.2
    fid0 = evaluation.fid_from_features(real, fake)
    s = Samples(labels, torch.ones(n, dtype=torch.float64), fake, real, fid0, fid0)
    blind = price(torch.randn(n, generator=g), s, gain=1.0, draws=16, seed=0)
    assert blind["ess"] < 0.5 * n
    assert blind["fid_ratio"] > 1.15
    assert blind["fid_ratio_corrected"] == pytest.approx(1.0, abs=2 * blind["fid_ratio_sd"])
    seen = price(fake[:, 0].clone(), s, gain=1.0, draws=16, seed=0)
    assert seen["fid_ratio_corrected"] > blind["fid_ratio_corrected"] + 3 * seen["fid_ratio_sd"]
    assert seen["consistency"] == pytest.approx(1.0)


def test_shuffle_within_moves_samples_only_inside_their_class():
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 2, 2])
    index = shuffle_within(labels, torch.Generator().manual_seed(0))
    assert sorted(index.tolist()) == list(range(8))
    assert torch.equal(labels[index], labels)


def test_shape_rewards_score_what_they_name():
    """On 8x8 strokes: a vertical bar is upright, a diagonal one is not; a centred blob is
    centred, a corner one is not; a bigger square is larger and bolder; a stray dot makes an
    image less smooth, a blurred edge makes it less crisp."""
    labels = torch.zeros(2, dtype=torch.long)
    bars = torch.zeros(2, 1, 8, 8)
    bars[0, 0, 1:7, 3] = 1.0  # vertical
    for i in range(1, 7):
        bars[1, 0, i, i] = 1.0  # diagonal: one column per row
    up = upright(bars, labels)
    assert up[0].item() == pytest.approx(0.0, abs=1e-6) and up[1].item() == pytest.approx(-1.0)
    blobs = torch.zeros(2, 1, 8, 8)
    blobs[0, 0, 3:5, 3:5] = 1.0
    blobs[1, 0, 0:2, 0:2] = 1.0
    c = centred(blobs, labels)
    assert c[0].item() == pytest.approx(0.0, abs=1e-6) and c[1].item() < -0.3
    squares = torch.zeros(2, 1, 8, 8)
    squares[0, 0, 3:5, 3:5] = 1.0
    squares[1, 0, 1:7, 1:7] = 1.0
    assert (size(squares, labels).diff() > 0).all() and (ink(squares, labels).diff() > 0).all()
    assert (thin(squares, labels).diff() < 0).all()
    edges = torch.zeros(3, 1, 8, 8)
    edges[:, :, :, 4:] = 1.0
    edges[1, :, :, 3], edges[1, :, :, 4] = 1 / 3, 2 / 3  # the same step, spread over 3 columns
    edges[2, :, 2, 1] = 1.0  # the sharp step and a stray dot
    labels = torch.zeros(3, dtype=torch.long)
    tv, contrast = smooth(edges, labels), crisp(edges, labels)
    # one unit step per row over the 8 x 7 horizontal neighbours; a blur is no rougher
    assert tv[0].item() == pytest.approx(-1 / 7) and tv[1].item() == pytest.approx(-1 / 7)
    assert tv[2] < tv[0]
    # every pixel at 0 or 1; the blur's two columns sit a sixth from mid-grey (1/3 rescaled)
    assert contrast[0].item() == pytest.approx(1.0)
    assert contrast[1].item() == pytest.approx((6 + 2 / 3) / 8)


def test_group_spread_is_the_log_distance_to_the_nearest_image_of_the_same_label():
    """Four 2x2 images: a pair 1 apart, an exact duplicate pair, and the label seen once."""
    images = torch.zeros(5, 1, 2, 2)
    images[1, 0, 0, 0] = 1.0  # 1 from image 0 (and from every other blank of label 0)
    images[2:4] = 0.5  # image 2 and its duplicate 3, label 1
    labels = torch.tensor([0, 0, 1, 1, 2])
    spread = group_spread(images, labels)
    assert spread[:2].tolist() == pytest.approx([0.0, 0.0])  # log 1
    assert spread[2:4].tolist() == pytest.approx([math.log(SPREAD_FLOOR)] * 2)
    assert spread[4].item() == 0.0  # nobody to be near: no bonus, no penalty
    # labels keep images apart: the blank 4 would otherwise be a duplicate of image 0
    assert group_spread(images[[0, 4]], torch.tensor([0, 0]))[0].item() < 0


def _measured(reward_mean: float, consistency: float, fid: float) -> dict[str, float]:
    return {"reward_mean": reward_mean, "reward_std": 0.5, "consistency": consistency, "fid": fid}


def test_the_rl_bar_needs_all_three_of_gain_consistency_and_fid():
    """Both RL benches judge with BarCheck: +2 pre-RL stds, at most 2 points of consistency
    lost, FID at most 1.2x; each edge passes, and missing any one fails."""
    before = _measured(1.0, 0.98, 10.0)
    edge = BarCheck.of(before, _measured(2.0, 0.96, 12.0))
    assert edge.gain == pytest.approx(2.0)
    assert edge.drop == pytest.approx(2.0)
    assert edge.fid_ratio == pytest.approx(1.2)
    assert BarCheck.of(before, _measured(2.5, 0.97, 11.0)).passed
    assert not BarCheck.of(before, _measured(1.9, 0.98, 10.0)).passed  # gain short
    assert not BarCheck.of(before, _measured(3.0, 0.955, 10.0)).passed  # consistency
    assert not BarCheck.of(before, _measured(3.0, 0.98, 12.5)).passed  # FID


def _measured_sets(rewards: torch.Tensor, features: torch.Tensor, real: torch.Tensor) -> dict:
    return {
        "rewards": rewards,
        "reward_mean": float(rewards.mean()),
        "reward_std": float(rewards.std()),
        "features": features,
        "real_features": real,
    }


def test_bar_intervals_give_the_gain_its_standard_error_and_fid_ratio_its_noise():
    """Gain: (mean difference +- 1.96 SE) / pre-RL std, in closed form. FID ratio: a draw
    from the same Gaussian as the pre-RL samples sits within its interval around 1, a shifted
    one outside it."""
    g = torch.Generator().manual_seed(0)
    n, d = 1000, 8
    real = torch.randn(n, d, generator=g)
    before = _measured_sets(torch.randn(n, generator=g), torch.randn(n, d, generator=g), real)
    rewards = torch.randn(n, generator=g) + 0.5
    same = _measured_sets(rewards, torch.randn(n, d, generator=g), real)
    intervals = bar_intervals(before, same)
    low, high = intervals["gain"]
    sb, sa = before["reward_std"], same["reward_std"]
    half = 1.96 * math.sqrt((sb**2 + sa**2) / n) / sb
    gain = (same["reward_mean"] - before["reward_mean"]) / sb
    assert (low, high) == pytest.approx((gain - half, gain + half))
    fid_low, fid_high = intervals["fid_ratio"]
    ratio = evaluation.fid_from_features(real, same["features"]) / evaluation.fid_from_features(
        real, before["features"]
    )
    assert fid_low < ratio < fid_high and fid_low < 1.0 < fid_high
    shifted = _measured_sets(rewards, torch.randn(n, d, generator=g) + 0.5, real)
    assert bar_intervals(before, shifted)["fid_ratio"][0] > 1.2
