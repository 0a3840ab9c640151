"""The judges' classifier architectures."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from genpipe.models.classifier import ARCHS, Classifier


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("image_size", [8, 28])
def test_logits_and_features_shapes(arch, image_size):
    torch.manual_seed(0)
    model = Classifier(arch, 1, image_size, num_classes=10, width=16, dropout=0.1).eval()
    x = torch.rand(5, 1, image_size, image_size)
    assert model(x).shape == (5, 10)
    assert model.features(x).shape == (5, model.feature_dim)


def test_archs_differ():
    counts = {
        arch: sum(p.numel() for p in Classifier(arch, 1, 8, 10, width=32).parameters())
        for arch in ARCHS
    }
    assert len(set(counts.values())) == len(ARCHS)


def test_unknown_arch_is_refused():
    with pytest.raises(ValueError, match="unknown classifier arch"):
        Classifier("vit", 1, 8, 10)


@pytest.mark.parametrize("arch", ARCHS)
def test_learns_a_toy_task(arch):
    """Bright-top vs bright-bottom images: a few steps must separate them."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (32,), generator=g)
    x = 0.2 * torch.rand(32, 1, 8, 8, generator=g)
    x[y == 0, :, :4] += 0.8
    x[y == 1, :, 4:] += 0.8
    model = Classifier(arch, 1, 8, num_classes=2, width=8, dropout=0.0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(20):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert (model.eval()(x).argmax(1) == y).float().mean() == 1.0
