"""Probes that say how much class information a frozen feature space holds: a linear classifier
and k-nearest neighbours fit on train features and scored on test features, plus a 2-D projection
for a picture. Pure functions of arrays; no torch, no I/O."""

from __future__ import annotations

import numpy as np
from sklearn import config_context
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.manifold import TSNE
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler


def _as_2d(feats: np.ndarray) -> np.ndarray:
    arr = np.asarray(feats, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"features must be (N, F), got shape {arr.shape}")
    return arr


def linear_probe(
    train_feats: np.ndarray,
    train_y: np.ndarray,
    test_feats: np.ndarray,
    test_y: np.ndarray,
    seed: int = 0,
    c: float = 1.0,
    max_iter: int = 5000,
) -> float:
    """Test accuracy of multinomial logistic regression on standardised features.

    Standardising puts every feature space (pixels, random or trained encoders) on one footing,
    so the comparison is about information, not scale; `max_iter` is ample for L-BFGS to converge.
    """
    model = make_pipeline(
        StandardScaler(), LogisticRegression(C=c, max_iter=max_iter, random_state=seed)
    )
    model.fit(_as_2d(train_feats), np.asarray(train_y))
    return float(model.score(_as_2d(test_feats), np.asarray(test_y)))


def knn_probe(
    train_feats: np.ndarray,
    train_y: np.ndarray,
    test_feats: np.ndarray,
    test_y: np.ndarray,
    k: int = 5,
    metric: str = "cosine",
    working_memory_mb: int = 128,
) -> float:
    """Test accuracy of a k-nearest-neighbour vote (brute force, so ties resolve deterministically).

    Cosine suits contrastive features, which are trained on normalised vectors.
    """
    model = KNeighborsClassifier(n_neighbors=k, metric=metric, algorithm="brute")
    model.fit(_as_2d(train_feats), np.asarray(train_y))
    # brute force holds a (chunk, N_train) block of distances and as many neighbour indices:
    # at sklearn's default 1 GiB per block that is 2+ GiB on MNIST, so cap the block
    with config_context(working_memory=working_memory_mb):
        return float(model.score(_as_2d(test_feats), np.asarray(test_y)))


def project_2d(feats: np.ndarray, method: str = "pca", seed: int = 0) -> np.ndarray:
    """(N, F) -> (N, 2) for a scatter plot: "pca" (fast, linear) or "tsne" (slower, local)."""
    x = _as_2d(feats)
    if method == "pca":
        return PCA(n_components=2, random_state=seed).fit_transform(x)
    if method == "tsne":
        perplexity = float(min(30, max(2, (x.shape[0] - 1) // 3)))
        tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)
        return tsne.fit_transform(x)
    raise ValueError(f"unknown projection method {method!r}; expected 'pca' or 'tsne'")
