"""Sample-quality measures against closed forms and brute force, and their bootstrap
intervals (contain the estimate, narrow with more samples, fixed by the seed)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from genpipe import evaluation
from genpipe import evaluation_intervals as intervals

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest


def gaussian_fd(mu1, var1, mu2, var2) -> float:
    """Frechet distance of two Gaussians with diagonal covariances, written out:
    ||mu1 - mu2||^2 + sum_i (var1_i + var2_i - 2 sqrt(var1_i var2_i))."""
    means = sum((a - b) ** 2 for a, b in zip(mu1, mu2))
    return means + sum(a + b - 2 * math.sqrt(a * b) for a, b in zip(var1, var2))


def exact_moments(mu: list[float], spread: list[float]) -> torch.Tensor:
    """2d points mu +- spread_i e_i: mean exactly mu, unbiased covariance exactly
    diag(2 spread_i^2 / (2d - 1))."""
    d = len(mu)
    steps = torch.diag(torch.tensor(spread, dtype=torch.float64))
    return torch.tensor(mu, dtype=torch.float64) + torch.cat([steps, -steps])[: 2 * d]


def diag_var(spread: list[float]) -> list[float]:
    return [2 * s**2 / (2 * len(spread) - 1) for s in spread]


MU1, SPREAD1 = [0.5, 0.3, 0.6], [0.1, 0.2, 0.05]
MU2, SPREAD2 = [0.4, 0.35, 0.6], [0.3, 0.1, 0.15]


# ---------------------------------------------------------------- FID


def test_frechet_distance_matches_the_closed_form_for_diagonal_and_rotated_covariances():
    mu1, mu2 = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.0, 1.0, 0.5])
    var1, var2 = [0.5, 2.0, 1.0], [4.0, 0.25, 1.0]
    expected = gaussian_fd(mu1.tolist(), var1, mu2.tolist(), var2)
    got = evaluation.frechet_distance(
        mu1, torch.diag(torch.tensor(var1)), mu2, torch.diag(torch.tensor(var2))
    )
    assert got == pytest.approx(expected, rel=1e-9)
    # the distance is invariant under one rotation of both Gaussians: full covariances now
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(0)).double())
    cov1 = q @ torch.diag(torch.tensor(var1)).double() @ q.t()
    cov2 = q @ torch.diag(torch.tensor(var2)).double() @ q.t()
    rotated = evaluation.frechet_distance(q @ mu1.double(), cov1, q @ mu2.double(), cov2)
    assert rotated == pytest.approx(expected, rel=1e-9)


def test_fid_from_features_with_exact_moments_is_the_closed_form():
    a, b = exact_moments(MU1, SPREAD1), exact_moments(MU2, SPREAD2)
    expected = gaussian_fd(MU1, diag_var(SPREAD1), MU2, diag_var(SPREAD2))
    assert evaluation.fid_from_features(a, b) == pytest.approx(expected, rel=1e-9)
    assert evaluation.fid_from_features(a, a) == pytest.approx(0.0, abs=1e-12)


def test_fid_of_gaussian_samples_approaches_the_closed_form():
    g = torch.Generator().manual_seed(0)
    mu1, sd1, mu2, sd2 = [0.0, 1.0], [1.0, 0.5], [1.0, 1.0], [2.0, 0.5]
    n = 50_000
    a = torch.tensor(mu1) + torch.tensor(sd1) * torch.randn(n, 2, generator=g)
    b = torch.tensor(mu2) + torch.tensor(sd2) * torch.randn(n, 2, generator=g)
    expected = gaussian_fd(mu1, [s**2 for s in sd1], mu2, [s**2 for s in sd2])  # 2.0
    assert evaluation.fid_from_features(a, b) == pytest.approx(expected, abs=0.05)
    assert evaluation.fid_from_features(a, a.clone()) == pytest.approx(0.0, abs=1e-9)


class Flatten(nn.Module):
    """A stand-in judge whose features are the pixels themselves."""

    feature_dim = 3

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


def test_fid_on_images_uses_the_extractor_and_the_closed_form():
    extractor = evaluation.FeatureExtractor(Flatten())
    a = exact_moments(MU1, SPREAD1).float().view(-1, 1, 1, 3)
    b = exact_moments(MU2, SPREAD2).float().view(-1, 1, 1, 3)
    expected = gaussian_fd(MU1, diag_var(SPREAD1), MU2, diag_var(SPREAD2))
    assert evaluation.fid(extractor, a, b) == pytest.approx(expected, rel=1e-5)
    assert evaluation.fid(extractor, a, a) == pytest.approx(0.0, abs=1e-6)


def test_fid_agrees_with_torchmetrics():
    """An independent implementation (eigenvalues of cov1 cov2) as the reference."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    g = torch.Generator().manual_seed(1)
    a = torch.rand(300, 1, 1, 3, generator=g)
    b = (torch.rand(200, 1, 1, 3, generator=g) * 0.6 + 0.3) ** 2
    extractor = evaluation.FeatureExtractor(Flatten())
    metric = FrechetInceptionDistance(feature=extractor, normalize=True)
    metric.update(a, real=True)
    metric.update(b, real=False)
    assert evaluation.fid(extractor, a, b) == pytest.approx(float(metric.compute()), rel=1e-5)


# ---------------------------------------------------------------- precision / recall


def brute_force_precision_recall(real, fake, k):
    """Kynkaanniemi et al. written out with loops: a point is inside a set's manifold when it
    lies within some member's distance to that member's k-th nearest other member."""

    def radius(points, i):
        others = sorted(float((points[i] - points[j]).norm()) for j in range(len(points)) if j != i)
        return others[k - 1]

    def share_inside(queries, members):
        radii = [radius(members, j) for j in range(len(members))]
        inside = [any(float((q - m).norm()) <= r for m, r in zip(members, radii)) for q in queries]
        return sum(inside) / len(inside)

    return share_inside(fake, real), share_inside(real, fake)


def test_precision_recall_identical_and_disjoint_sets():
    x = torch.randn(40, 5, generator=torch.Generator().manual_seed(0))
    assert evaluation.precision_recall(x, x.clone(), k=3) == {"precision": 1.0, "recall": 1.0}
    far = x + 100.0
    assert evaluation.precision_recall(x, far, k=3) == {"precision": 0.0, "recall": 0.0}


@pytest.mark.parametrize("k", [1, 3, 5])
def test_precision_recall_equals_brute_force(k):
    g = torch.Generator().manual_seed(k)
    real = torch.randn(30, 4, generator=g)
    fake = torch.randn(30, 4, generator=g) + 1.5
    precision, recall = brute_force_precision_recall(real, fake, k)
    got = evaluation.precision_recall(real, fake, k)
    assert 0 < precision < 1 and 0 < recall < 1
    assert got["precision"] == pytest.approx(precision)
    assert got["recall"] == pytest.approx(recall)


def test_precision_recall_cuts_the_larger_set_to_the_smaller_size_by_seed():
    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(25, 4, generator=g), torch.randn(90, 4, generator=g) + 0.3
    cut_real, cut_fake = evaluation.equal_size(real, fake, seed=3)
    assert torch.equal(cut_real, real) and len(cut_fake) == 25
    assert all((row == fake).all(dim=1).any() for row in cut_fake)  # rows of fake, no repeats
    assert len({tuple(r.tolist()) for r in cut_fake}) == 25
    precision, recall = brute_force_precision_recall(cut_real, cut_fake, 3)
    got = evaluation.precision_recall(real, fake, 3, seed=3)
    assert got == pytest.approx({"precision": precision, "recall": recall})
    assert got == evaluation.precision_recall(real, fake, 3, seed=3)
    others = [evaluation.precision_recall(real, fake, 3, seed=s) for s in range(4, 8)]
    assert any(o != got for o in others)  # the subsample depends on the seed
    swapped = evaluation.precision_recall(fake, real, 3, seed=3)  # larger set on either side
    assert swapped == pytest.approx({"precision": recall, "recall": precision})


def test_precision_recall_rejects_k_beyond_the_set():
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="knn_k must be in"):
        evaluation.precision_recall(x, x, k=5)


def test_copies_in_a_resample_are_not_neighbours():
    """Source ids [0, 0, 1, 2, 3]: both copies of point 0 take their radius from 1, 2, 3."""
    pts = torch.tensor([[0.0], [1.0], [3.0], [7.0]])
    ids = torch.tensor([0, 0, 1, 2, 3])
    d = torch.cdist(pts[ids], pts[ids])
    radii = evaluation.knn_radii(d, ids, k=1)
    assert radii.tolist() == [1.0, 1.0, 1.0, 2.0, 4.0]


# ---------------------------------------------------------------- consistency, diversity


class FirstPixel(nn.Module):
    """Predicts the class written in an image's first pixel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.one_hot(x[:, 0, 0, 0].long(), 10).float()


def test_class_consistency_counts_matching_predictions_across_batches():
    labels = torch.arange(1100) % 10
    images = torch.zeros(1100, 1, 2, 2)
    images[:, 0, 0, 0] = labels.float()
    wrong = torch.arange(1100) % 4 == 0  # 275 images show another class
    images[wrong, 0, 0, 0] = ((labels[wrong] + 1) % 10).float()
    assert evaluation.class_consistency(FirstPixel(), images, labels) == pytest.approx(0.75)
    assert torch.equal(evaluation.predictions(FirstPixel(), images)[~wrong], labels[~wrong])


def test_mean_pairwise_distance_on_known_shapes():
    square = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    assert evaluation.mean_pairwise_distance(square) == pytest.approx((4 + 2 * math.sqrt(2)) / 6)
    assert evaluation.mean_pairwise_distance(torch.ones(5, 3)) == 0.0
    assert evaluation.mean_pairwise_distance(square[:1]) == 0.0


def test_code_entropy_in_bits():
    assert evaluation.code_entropy(torch.tensor([0, 1, 2, 3] * 5), 16) == pytest.approx(2.0)
    assert evaluation.code_entropy(torch.zeros(10, dtype=torch.long), 16) == 0.0


# ---------------------------------------------------------------- bootstrap intervals


def width(iv: intervals.Interval) -> float:
    return iv.high - iv.low


def consistency_case(n: int, seed: int = 0):
    labels = torch.arange(n) % 10
    hit = torch.rand(n, generator=torch.Generator().manual_seed(seed)) < 0.8
    return torch.where(hit, labels, (labels + 1) % 10), labels


def test_consistency_interval_is_the_binomial_spread():
    preds, labels = consistency_case(2000)
    iv = intervals.consistency_interval(preds, labels, resamples=2000)
    p = float((preds == labels).float().mean())
    assert iv.estimate == pytest.approx(p) and iv.low < p < iv.high
    normal = 2 * 1.96 * math.sqrt(p * (1 - p) / 2000)  # 0.035
    assert width(iv) == pytest.approx(normal, rel=0.15)
    small = intervals.consistency_interval(*consistency_case(100), resamples=2000)
    assert width(small) > 3 * width(iv)  # sqrt(20) = 4.5 times wider in theory
    assert intervals.consistency_interval(preds, labels, resamples=2000) == iv
    assert intervals.consistency_interval(preds, labels, resamples=2000, seed=1) != iv


def gaussian_sets(n: int, seed: int = 0, shift: float = 0.6):
    """Test split, generated and floor features. The floor is a little off too (0.3): with a
    floor from the test split's own distribution, FID(floor) is all finite-N bias and the
    ratio grows with N instead of settling."""
    g = torch.Generator().manual_seed(seed)
    real = torch.randn(n, 4, generator=g)
    fake = torch.randn(n, 4, generator=g) + shift
    return real, fake, torch.randn(n, 4, generator=g) + 0.3


def test_fid_ratio_interval_contains_the_estimate_and_narrows_with_more_samples():
    small = intervals.fid_ratio_interval(*gaussian_sets(200), resamples=300)
    large = intervals.fid_ratio_interval(*gaussian_sets(2000), resamples=300)
    for iv in (small, large):
        assert iv.low < iv.estimate < iv.high
    real, fake, floor = gaussian_sets(2000)
    expected = evaluation.fid_from_features(real, fake) / evaluation.fid_from_features(real, floor)
    assert large.estimate == pytest.approx(expected)
    assert width(large) < 0.5 * width(small)
    assert intervals.fid_ratio_interval(*gaussian_sets(200), resamples=300) == small
    assert intervals.fid_ratio_interval(*gaussian_sets(200), resamples=300, seed=1) != small


def test_precision_recall_intervals_contain_the_estimate_and_narrow_with_more_samples():
    def run(n: int, seed: int = 0):
        real, fake, _ = gaussian_sets(n, shift=0.3)
        return intervals.precision_recall_intervals(real, fake, 3, resamples=200, seed=seed)

    small, large = run(60), run(480)
    real, fake, _ = gaussian_sets(480, shift=0.3)
    assert {k: v.estimate for k, v in large.items()} == evaluation.precision_recall(real, fake, 3)
    for key in ("precision", "recall"):
        for iv in (small[key], large[key]):
            assert 0.0 <= iv.low < iv.estimate < iv.high <= 1.0
        assert width(large[key]) < 0.6 * width(small[key])
    assert run(60) == small and run(60, seed=1) != small


def test_sample_intervals_cover_the_gated_measures():
    real, fake, floor = gaussian_sets(80)
    preds, labels = consistency_case(80)
    out = intervals.sample_intervals(real, fake, floor, preds, labels, resamples=50)
    assert set(out) == {"fid_ratio", "precision", "recall", "class_consistency"}
    assert all(iv.low <= iv.estimate <= iv.high for iv in out.values())


def test_percentile_interval_centring_and_limits():
    reps = torch.arange(101, dtype=torch.float64)  # quantiles 2.5 / 50 / 97.5 = 2.5, 50, 97.5
    plain = intervals.percentile_interval(60.0, reps, 0.95)
    assert (plain.low, plain.high, plain.offset) == pytest.approx((2.5, 97.5, -10.0))
    centred = intervals.percentile_interval(60.0, reps, 0.95, centred=True, limits=(0, 100))
    assert (centred.low, centred.high) == pytest.approx((12.5, 100.0))
    with pytest.raises(ValueError, match="level"):
        intervals.consistency_interval(*consistency_case(10), level=1.0)
    with pytest.raises(ValueError, match="resamples"):
        intervals.consistency_interval(*consistency_case(10), resamples=1)


def test_floor_sample_takes_the_same_number_per_class_from_the_split_it_is_given():
    y = torch.tensor([0] * 30 + [1] * 7 + [2] * 12)
    x = torch.arange(len(y), dtype=torch.float64)[:, None]
    floor, m = evaluation.floor_sample(x, y, per_class=10, seed=0)
    assert m == 7  # the smallest class bounds it
    assert torch.bincount(y[floor.flatten().long()]).tolist() == [7, 7, 7]
    assert len(set(floor.flatten().tolist())) == 21  # no image twice
    assert torch.equal(evaluation.floor_sample(x, y, 10, seed=0)[0], floor)
    assert evaluation.floor_sample(x, y, per_class=5, seed=0)[1] == 5
    with pytest.raises(ValueError, match="val_frac"):
        evaluation.floor_sample(x[:31], y[:31], per_class=10, seed=0)  # class 1 has 1 image


def test_equal_n_sets_are_disjoint_class_balanced_cuts_of_the_generated_rows():
    per_class, classes, m = 10, 3, 3
    fake = torch.arange(per_class * classes, dtype=torch.float64)[:, None]
    sets = evaluation.equal_n_sets(fake, per_class, classes, m)
    assert len(sets) == 3 and all(len(s) == m * classes for s in sets)
    rows = torch.cat(sets).flatten().long()
    assert len(set(rows.tolist())) == len(rows)  # disjoint; the 10th of each class is left out
    for s in sets:
        assert (s.flatten().long() // per_class).tolist() == [0] * 3 + [1] * 3 + [2] * 3


def test_fid_at_equal_n_matches_the_floor_where_unequal_n_flatters_the_larger_set():
    """Generated and floor drawn from the test split's own distribution: a perfect generator,
    whose FID should equal the floor's on average. FID's finite-N bias falls with N, so 1,000
    generated against a floor of 270 reads about 0.7 of it (better than real data); cut into
    sets of the floor's N (as evaluation.score does) it reads about 1. Means over 64 draws,
    because a ratio of two noisy FIDs is itself biased upwards (Jensen)."""
    fid = evaluation.fid_from_features
    equal = unequal = floors = 0.0
    for seed in range(64):
        g = torch.Generator().manual_seed(seed)
        real, fake, floor = (torch.randn(n, 4, generator=g) for n in (270, 1000, 270))
        floors += fid(real, floor)
        unequal += fid(real, fake)
        sets = evaluation.equal_n_sets(fake, 100, 10, 27)
        equal += sum(fid(real, s) for s in sets) / len(sets)
        iv = intervals.fid_ratio_interval(real, sets, floor, resamples=2)
        assert iv.estimate == pytest.approx(sum(fid(real, s) for s in sets) / 3 / fid(real, floor))
    assert unequal / floors < 0.8
    assert equal / floors == pytest.approx(1.0, abs=0.1)
