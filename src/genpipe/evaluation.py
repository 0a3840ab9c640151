"""Sample-quality measures, computed in the evaluator judge's feature space, and the one way
a generator is sampled and scored (evaluate, register and finetune all use `generate`).

FID is the Frechet distance between Gaussians fitted to evaluator features (float64);
precision/recall follow the k-NN manifold estimate (Kynkaanniemi et al. 2019) on sets of
equal size. Measures are pure functions of per-sample features or predictions, so
genpipe.evaluation_intervals can bootstrap them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from genpipe.config import Evaluate
    from genpipe.generator import Generator
    from genpipe.models.tokenizer import VQAutoencoder


class FeatureExtractor(nn.Module):
    """Adapts a judge classifier: images (uint8 or float in [0, 1]) in, penultimate features
    out, in float64."""

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier.eval()
        self.num_features = int(classifier.feature_dim)  # type: ignore[arg-type]

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        return self.classifier.features(x).double()  # type: ignore[operator]


def gaussian_stats(feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased (n - 1) covariance of features (N, d), in float64."""
    if len(feats) < 2:
        raise ValueError(f"FID needs at least 2 samples per set, got {len(feats)}")
    x = feats.double()
    mu = x.mean(dim=0)
    centred = x - mu
    return mu, centred.t() @ centred / (len(x) - 1)


def _sqrtm_psd(m: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix (eigenvalues clamped at 0)."""
    vals, vecs = torch.linalg.eigh(m)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.t()


def frechet_distance(
    mu1: torch.Tensor, cov1: torch.Tensor, mu2: torch.Tensor, cov2: torch.Tensor
) -> float:
    """||mu1 - mu2||^2 + tr(cov1 + cov2 - 2 (cov1 cov2)^(1/2)), the Frechet (2-Wasserstein)
    distance squared between N(mu1, cov1) and N(mu2, cov2). The trace of the root is taken as
    tr (cov1^(1/2) cov2 cov1^(1/2))^(1/2): a symmetric matrix, so its eigenvalues are real."""
    cov1, cov2 = cov1.double(), cov2.double()
    root1 = _sqrtm_psd(cov1)
    middle = root1 @ cov2 @ root1
    cross = torch.linalg.eigvalsh((middle + middle.t()) / 2).clamp_min(0).sqrt().sum()
    means = (mu1.double() - mu2.double()).square().sum()
    return float(means + cov1.trace() + cov2.trace() - 2 * cross)


def fid_from_features(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (N, d) and (M, d)."""
    return frechet_distance(*gaussian_stats(real), *gaussian_stats(fake))


def fid(extractor: FeatureExtractor, real: torch.Tensor, fake: torch.Tensor) -> float:
    """Frechet distance between evaluator features of two image sets in [0, 1]."""
    return fid_from_features(
        features(extractor, real.clamp(0, 1)), features(extractor, fake.clamp(0, 1))
    )


@torch.no_grad()
def features(extractor: FeatureExtractor, images: torch.Tensor) -> torch.Tensor:
    return torch.cat([extractor(images[i : i + 512]) for i in range(0, len(images), 512)]).float()


def equal_size(
    real: torch.Tensor, fake: torch.Tensor, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both sets cut to the smaller one's size by a seeded subsample (without replacement,
    order kept) of the larger: k-NN radii shrink as a set grows, so sets of unequal size
    would make precision and recall compare manifolds drawn at different resolutions."""
    n = min(len(real), len(fake))
    g = torch.Generator().manual_seed(seed)

    def cut(x: torch.Tensor) -> torch.Tensor:
        return x if len(x) == n else x[torch.randperm(len(x), generator=g)[:n].sort().values]

    return cut(real), cut(fake)


def knn_radii(dists: torch.Tensor, source: torch.Tensor, k: int) -> torch.Tensor:
    """Distance from each point to its k-th nearest neighbour within its set, given the set's
    distance matrix; points with the same `source` index (a point itself, or its copies in a
    bootstrap resample) do not count as neighbours."""
    same = source[:, None] == source[None, :]
    return dists.masked_fill(same, math.inf).kthvalue(k, dim=1).values


def precision_recall_from_distances(
    real_dists: torch.Tensor,
    fake_dists: torch.Tensor,
    cross: torch.Tensor,
    k: int,
    real_source: torch.Tensor,
    fake_source: torch.Tensor,
) -> dict[str, float]:
    """Precision and recall from within-set distances and fake-to-real distances (F, R)."""
    real_r = knn_radii(real_dists, real_source, k)
    fake_r = knn_radii(fake_dists, fake_source, k)
    precision = (cross <= real_r[None, :]).any(dim=1).float().mean()
    recall = (cross.t() <= fake_r[None, :]).any(dim=1).float().mean()
    return {"precision": float(precision), "recall": float(recall)}


def precision_recall(
    real: torch.Tensor, fake: torch.Tensor, k: int = 3, seed: int = 0
) -> dict[str, float]:
    """Precision: share of fakes inside the real manifold; recall: share of reals inside
    the fake manifold (each manifold = union of the balls reaching each point's k-th nearest
    neighbour). The larger set is first subsampled to the smaller one's size (`equal_size`,
    seeded): the estimate assumes sets of equal size."""
    real, fake = equal_size(real, fake, seed)
    if not 1 <= k < len(real):
        raise ValueError(
            f"evaluate.knn_k must be in [1, {len(real) - 1}] for sets of {len(real)} samples, "
            f"got {k}: lower it or raise evaluate.samples_per_class"
        )
    ids = torch.arange(len(real))
    return precision_recall_from_distances(
        torch.cdist(real, real), torch.cdist(fake, fake), torch.cdist(fake, real), k, ids, ids
    )


@torch.no_grad()
def predictions(classifier: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The classifier's predicted class for each image, in batches."""
    return torch.cat(
        [classifier(images[i : i + 512]).argmax(1) for i in range(0, len(images), 512)]
    )


def class_consistency(classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of images the classifier assigns to the class they were generated for."""
    return float((predictions(classifier, images) == labels).float().mean())


def mean_pairwise_distance(feats: torch.Tensor) -> float:
    """Diversity: mean Euclidean distance over all pairs of distinct samples (0 below 2)."""
    n = len(feats)
    if n < 2:
        return 0.0
    return float(torch.pdist(feats).mean())


def code_entropy(codes: torch.Tensor, codebook_size: int) -> float:
    """Entropy (bits) of the code histogram: low when samples reuse few codes."""
    counts = torch.bincount(codes.flatten(), minlength=codebook_size).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum() / math.log(2))


@torch.no_grad()
def batched(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch_size: int = 512
) -> torch.Tensor:
    """Apply `fn` over `x` in chunks (inference over a whole split)."""
    return torch.cat([fn(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


@torch.no_grad()
def reconstruction(model: VQAutoencoder, x: torch.Tensor, device: torch.device) -> dict[str, float]:
    """A tokenizer on a split: MSE/PSNR of the reconstructions, usage and perplexity of the
    codes."""
    model = model.to(device).eval()
    codes = batched(lambda b: model.encode_codes(b.to(device)).cpu(), x)
    recon = batched(lambda c: model.decode_codes(c.to(device)).cpu(), codes)
    mse = float(F.mse_loss(recon.float(), x))
    counts = torch.bincount(codes.flatten(), minlength=model.codebook_size).double()
    probs = counts / counts.sum()
    entropy = float(-(probs[probs > 0] * probs[probs > 0].log()).sum())
    return {
        "mse": mse,
        "psnr": 10 * math.log10(1.0 / max(mse, 1e-12)),
        "codebook_usage": float((counts > 0).double().mean()),
        "perplexity": math.exp(entropy),
    }


def generate(
    gen: Generator, per_class: int, num_classes: int, seed: int, **overrides: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Class-ordered samples on the CPU: images, their requested labels and their codes,
    sampled as the prior file says but for `overrides` (e.g. cfg_scale)."""
    device = next(gen.parameters()).device
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    codes = gen.sample_codes(labels.to(device), torch.Generator().manual_seed(seed), **overrides)
    with torch.no_grad():
        images = gen.tokenizer.decode_codes(codes)
    return images.cpu(), labels, codes.cpu()


def floor_sample(
    x: torch.Tensor, y: torch.Tensor, per_class: int, seed: int
) -> tuple[torch.Tensor, int]:
    """The FID floor's real images: from a split the evaluator never trained on (val), the
    same number m per class, m = min(per_class, the smallest class), seeded. Returns the
    class-ordered images and m."""
    classes = torch.unique(y)
    m = min(per_class, *(int((y == c).sum()) for c in classes))
    if m < 2:
        raise ValueError(
            f"the FID floor needs >= 2 held-out images per class, the smallest class has {m}: "
            "raise prepare.val_frac"
        )
    g = torch.Generator().manual_seed(seed)
    picks = [
        torch.nonzero(y == c).flatten()[torch.randperm(int((y == c).sum()), generator=g)[:m]]
        for c in classes
    ]
    return x[torch.cat(picks)], m


def equal_n_sets(
    fake: torch.Tensor, per_class: int, num_classes: int, m: int
) -> list[torch.Tensor]:
    """Class-ordered generated rows (per_class per class) cut into per_class // m disjoint
    sets of m per class, the floor's size: FID falls as N grows, so FID(fake) / FID(floor) at
    unequal N would flatter whichever set is larger."""
    by_class = fake.reshape(num_classes, per_class, *fake.shape[1:])
    return [
        by_class[:, j * m : (j + 1) * m].reshape(num_classes * m, *fake.shape[1:])
        for j in range(per_class // m)
    ]


def score(
    gen: Generator,
    evaluator: nn.Module,
    test_x: torch.Tensor,
    floor_x: torch.Tensor,
    cfg: Evaluate,
    num_classes: int,
    seed: int,
    resamples: int | None = None,
) -> tuple[dict[str, float], torch.Tensor]:
    """All sample metrics of one generator (cfg.samples_per_class per class), and its samples.
    `resamples`: bootstrap resamples per interval, None for `sample_intervals`' own (1,000);
    at 500 per class those take most of an hour on a 2-core CPU, so a sweep may take fewer."""
    images, labels, codes = generate(gen, cfg.samples_per_class, num_classes, seed)
    extractor = FeatureExtractor(evaluator)
    fake_f, real_f = features(extractor, images), features(extractor, test_x)
    floor_f, preds = features(extractor, floor_x), predictions(evaluator, images)
    m = len(floor_x) // num_classes
    fakes = equal_n_sets(fake_f, cfg.samples_per_class, num_classes, m)
    fid_at_floor_n = sum(fid_from_features(real_f, f) for f in fakes) / len(fakes)
    floor = fid_from_features(real_f, floor_f)
    # intervals import this module: imported here, once the module is complete
    from genpipe.evaluation_intervals import sample_intervals

    cis = sample_intervals(
        real_f,
        fake_f,
        floor_f,
        preds,
        labels,
        cfg.knn_k,
        seed=seed,
        fake_sets=fakes,
        **({} if resamples is None else {"resamples": resamples}),
    )
    return {
        "fid": fid_from_features(real_f, fake_f),
        "fid_at_floor_n": fid_at_floor_n,
        "fid_floor": floor,
        "fid_floor_n": len(floor_x),
        "fid_ratio": fid_at_floor_n / max(floor, 1e-9),
        **precision_recall(real_f, fake_f, cfg.knn_k, seed),
        **{f"{k}_ci_{end}": getattr(iv, end) for k, iv in cis.items() for end in ("low", "high")},
        "class_consistency": class_consistency(evaluator, images, labels),
        "diversity": mean_pairwise_distance(fake_f),
        "code_entropy_bits": code_entropy(codes, gen.tokenizer.codebook_size),
    }, images
