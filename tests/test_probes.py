"""Linear and kNN probes and the 2-D projection."""

from __future__ import annotations

import numpy as np
import pytest

from genpipe.probes import knn_probe, linear_probe, project_2d


def _blobs(n: int, seed: int, spread: float) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(0).normal(size=(5, 16)) * 10
    y = rng.integers(0, 5, n)
    return centres[y] + spread * rng.normal(size=(n, 16)), y


def test_probes_separate_separable_features():
    xtr, ytr = _blobs(200, 1, spread=1.0)
    xte, yte = _blobs(100, 2, spread=1.0)
    assert linear_probe(xtr, ytr, xte, yte, seed=0) == 1.0
    assert knn_probe(xtr, ytr, xte, yte, k=5) == 1.0


def test_probes_are_at_chance_on_random_labels():
    rng = np.random.default_rng(0)
    xtr, xte = rng.normal(size=(400, 16)), rng.normal(size=(400, 16))
    ytr, yte = rng.integers(0, 10, 400), rng.integers(0, 10, 400)
    assert linear_probe(xtr, ytr, xte, yte, seed=0) < 0.2
    assert knn_probe(xtr, ytr, xte, yte, k=5) < 0.2


def test_probes_refuse_non_matrix_features():
    with pytest.raises(ValueError, match=r"\(N, F\)"):
        linear_probe(np.zeros((4, 2, 2)), np.zeros(4), np.zeros((4, 4)), np.zeros(4))


def test_project_2d_shape_determinism_and_main_axis():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 6))
    x[:30, 0] += 5  # two groups along feature 0
    xy = project_2d(x, "pca", seed=0)
    assert xy.shape == (60, 2)
    np.testing.assert_array_equal(xy, project_2d(x, "pca", seed=0))
    assert abs(xy[:30, 0].mean() - xy[30:, 0].mean()) > 2.0  # first axis splits the groups
    assert project_2d(x[:20], "tsne", seed=0).shape == (20, 2)
    with pytest.raises(ValueError, match="unknown projection"):
        project_2d(x, "umap")


def test_knn_probe_memory_is_bounded_by_its_working_memory():
    """Brute-force k-NN scores in blocks: MNIST-sized splits must not hold every distance."""
    import tracemalloc

    rng = np.random.default_rng(0)
    xtr, xte = rng.normal(size=(10_000, 8)), rng.normal(size=(2_000, 8))
    ytr, yte = rng.integers(0, 10, 10_000), rng.integers(0, 10, 2_000)
    tracemalloc.start()
    knn_probe(xtr, ytr, xte, yte, k=5, working_memory_mb=8)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 64 * 2**20, f"{peak / 2**20:.0f} MiB"  # all distances at once: 160 MiB, twice
