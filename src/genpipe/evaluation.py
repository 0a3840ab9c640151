"""Sample-quality measures, computed in the evaluator judge's feature space.

FID uses torchmetrics' implementation with the evaluator as a custom feature extractor;
precision/recall follow the k-NN manifold estimate (Kynkaanniemi et al. 2019).
"""

from __future__ import annotations

import math

import torch
from torch import nn


class FeatureExtractor(nn.Module):
    """Adapts a judge classifier to torchmetrics: uint8 images in, penultimate features out."""

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier.eval()
        self.num_features = int(classifier.feature_dim)  # type: ignore[arg-type]

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        return self.classifier.features(x).double()  # type: ignore[operator]


def fid(extractor: FeatureExtractor, real: torch.Tensor, fake: torch.Tensor) -> float:
    """Frechet distance between evaluator features of two image sets in [0, 1]."""
    # imported here: torchmetrics pulls in torchvision, scipy and torch._dynamo (~4.5 s), which
    # stages that only need class_consistency should not pay at start-up
    from torchmetrics.image.fid import FrechetInceptionDistance

    # statistics accumulate in float64 inside torchmetrics; the extractor stays float32
    metric = FrechetInceptionDistance(feature=extractor, normalize=True, reset_real_features=True)
    for x, real_flag in ((real, True), (fake, False)):
        for i in range(0, len(x), 512):
            metric.update(x[i : i + 512].clamp(0, 1), real=real_flag)
    return float(metric.compute())


@torch.no_grad()
def features(extractor: FeatureExtractor, images: torch.Tensor) -> torch.Tensor:
    return torch.cat([extractor(images[i : i + 512]) for i in range(0, len(images), 512)]).float()


def _radii(feats: torch.Tensor, k: int) -> torch.Tensor:
    """Distance from each point to its k-th nearest neighbour within the same set."""
    d = torch.cdist(feats, feats)
    return d.kthvalue(k + 1, dim=1).values  # +1: the point itself is at distance 0


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> dict[str, float]:
    """Precision: share of fakes inside the real manifold; recall: share of reals inside
    the fake manifold (each manifold = union of k-NN balls around its points)."""
    real_r, fake_r = _radii(real, k), _radii(fake, k)
    d = torch.cdist(fake, real)  # (F, R)
    precision = (d <= real_r[None, :]).any(dim=1).float().mean()
    recall = (d.t() <= fake_r[None, :]).any(dim=1).float().mean()
    return {"precision": float(precision), "recall": float(recall)}


@torch.no_grad()
def class_consistency(classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of images the classifier assigns to the class they were generated for."""
    preds = torch.cat(
        [classifier(images[i : i + 512]).argmax(1) for i in range(0, len(images), 512)]
    )
    return float((preds == labels).float().mean())


def mean_pairwise_distance(feats: torch.Tensor) -> float:
    n = len(feats)
    if n < 2:
        return 0.0
    return float(torch.pdist(feats).mean())


def code_entropy(codes: torch.Tensor, codebook_size: int) -> float:
    """Entropy (bits) of the code histogram: low when samples reuse few codes."""
    counts = torch.bincount(codes.flatten(), minlength=codebook_size).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum() / math.log(2))
