"""Sample-quality measures, computed in the evaluator judge's feature space, and the one way
a generator is sampled and scored (evaluate, register and finetune all use `generate`).

FID uses torchmetrics' implementation with the evaluator as a custom feature extractor;
precision/recall follow the k-NN manifold estimate (Kynkaanniemi et al. 2019).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from genpipe.config import Evaluate
    from genpipe.generator import Generator
    from genpipe.models.tokenizer import VQAutoencoder


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
    gen: Generator, per_class: int, num_classes: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Class-ordered samples on the CPU: images, their requested labels and their codes."""
    device = next(gen.parameters()).device
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    codes = gen.sample_codes(labels.to(device), torch.Generator().manual_seed(seed))
    with torch.no_grad():
        images = gen.tokenizer.decode_codes(codes)
    return images.cpu(), labels, codes.cpu()


def floor_sample(
    train_x: torch.Tensor, train_y: torch.Tensor, per_class: int, seed: int
) -> torch.Tensor:
    """As many real train images per class as generated, for the FID floor."""
    g = torch.Generator().manual_seed(seed)
    picks = []
    for c in torch.unique(train_y):
        idx = torch.nonzero(train_y == c).flatten()
        picks.append(idx[torch.randperm(len(idx), generator=g)[:per_class]])
    return train_x[torch.cat(picks)]


def score(
    gen: Generator,
    evaluator: nn.Module,
    test_x: torch.Tensor,
    floor_x: torch.Tensor,
    cfg: Evaluate,
    num_classes: int,
    seed: int,
) -> tuple[dict[str, float], torch.Tensor]:
    """All sample metrics of one generator (cfg.samples_per_class per class), and its samples."""
    images, labels, codes = generate(gen, cfg.samples_per_class, num_classes, seed)
    extractor = FeatureExtractor(evaluator)
    fid_value = fid(extractor, test_x, images)
    floor = fid(extractor, test_x, floor_x)
    fake_f, real_f = features(extractor, images), features(extractor, test_x)
    return {
        "fid": fid_value,
        "fid_floor": floor,
        "fid_ratio": fid_value / max(floor, 1e-9),
        **precision_recall(real_f, fake_f, cfg.knn_k),
        "class_consistency": class_consistency(evaluator, images, labels),
        "diversity": mean_pairwise_distance(fake_f),
        "code_entropy_bits": code_entropy(codes, gen.tokenizer.codebook_size),
    }, images
