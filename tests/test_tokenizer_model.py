"""The tokenizer's API contract and the adversarial / perceptual helpers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from genpipe.models.autoencoder import Encoder
from genpipe.models.discriminator import (
    PatchDiscriminator,
    PerceptualLoss,
    adaptive_weight,
    hinge_d_loss,
    hinge_g_loss,
)
from genpipe.models.tokenizer import VQAutoencoder

QUANTIZERS = [
    ("vq", {"codebook_size": 32}),
    ("vq", {"codebook_size": 32, "code_dim": 4, "cosine": True}),
    ("fsq", {"levels": [5, 5, 3]}),
]


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest


def _images(b: int = 6, size: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 1, size, size, generator=torch.Generator().manual_seed(seed))


def _model(kind: str = "vq", **kwargs) -> VQAutoencoder:
    torch.manual_seed(0)
    return VQAutoencoder(1, (8, 16), 1, 8, kind, **kwargs)


@pytest.mark.parametrize(("kind", "kwargs"), QUANTIZERS)
def test_forward_shapes_and_api_consistency(kind: str, kwargs: dict) -> None:
    model = _model(kind, **kwargs)
    x = _images()
    x_hat, codes, q_loss, stats = model(x)  # train mode: initialises the codebook
    assert x_hat.shape == x.shape and codes.shape == (6, 4, 4) and q_loss.ndim == 0
    assert model.grid(8) == (4, 4) and "perplexity" in stats and "usage" in stats
    model.eval()
    with torch.no_grad():
        x_hat, codes, _, _ = model(x)
        assert codes.min() >= 0 and codes.max() < model.codebook_size
        assert torch.equal(model.encode_codes(x), codes)
        latent = model.encode(x)
        assert latent.shape == (6, model.latent_dim, 4, 4)
        assert torch.equal(model.latent_to_codes(latent), codes)
        assert torch.equal(model.latent_to_codes(model.codes_to_latent(codes)), codes)
        images = model.decode_codes(codes)
        torch.testing.assert_close(images, x_hat)
        assert images.min() >= 0 and images.max() <= 1
        torch.testing.assert_close(model.decode_latent(model.codes_to_latent(codes)), images)


def test_reconstruction_gradient_reaches_encoder_through_quantizer() -> None:
    model = _model(codebook_size=32)
    x = _images()
    x_hat, _, q_loss, _ = model(x)
    F.mse_loss(x_hat, x).backward()  # no q_loss: only the straight-through path feeds the encoder
    first = model.encoder.net[0].weight.grad
    assert first is not None and first.abs().sum() > 0


def test_training_steps_reduce_reconstruction_error() -> None:
    model = _model(codebook_size=32)
    x = _images(b=8)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        x_hat, _, q_loss, _ = model(x)
        loss = F.mse_loss(x_hat, x)
        losses.append(loss.item())
        opt.zero_grad()
        (loss + q_loss).backward()
        opt.step()
    assert losses[-1] < 0.5 * losses[0]


def test_grid_rejects_sizes_the_encoder_cannot_tile() -> None:
    model = _model(codebook_size=8)
    assert model.grid((16, 8)) == (8, 4)
    with pytest.raises(ValueError, match="not divisible"):
        model.grid(9)


@pytest.mark.parametrize(("size", "layers", "logits"), [(8, 1, 4), (32, 3, 4)])
def test_patch_discriminator_shapes(size: int, layers: int, logits: int) -> None:
    disc = PatchDiscriminator(1, 16, layers)
    assert disc(_images(size=size)).shape == (6, 1, logits, logits)


def test_hinge_losses_on_known_logits() -> None:
    real = torch.tensor([2.0, 0.5])
    fake = torch.tensor([-2.0, 0.5])
    # real: relu(1 - [2, .5]) = [0, .5]; fake: relu(1 + [-2, .5]) = [0, 1.5]
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (0.25 + 0.75))
    assert hinge_g_loss(fake).item() == pytest.approx(0.75)


def test_adaptive_weight_is_ratio_of_gradient_norms() -> None:
    w = nn.Parameter(torch.ones(2))
    rec = (w * torch.tensor([3.0, 4.0])).sum()  # grad norm 5
    g = (w * torch.tensor([0.0, 2.0])).sum()  # grad norm 2
    weight = adaptive_weight(rec, g, w, max_weight=10.0)
    assert weight.item() == pytest.approx(5.0 / (2.0 + 1e-4))
    assert not weight.requires_grad
    assert adaptive_weight(rec, g, w, max_weight=1.0).item() == 1.0


def test_perceptual_loss_is_frozen_and_differentiable() -> None:
    net = Encoder(1, (8, 16), 1, 8)
    loss_fn = PerceptualLoss(net)
    loss_fn.train()
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    x, y = _images(seed=1), _images(seed=2)
    assert loss_fn(x, x).item() == 0.0
    x.requires_grad_(True)
    loss = loss_fn(x, y)
    loss.backward()
    assert loss.item() > 0 and x.grad.abs().sum() > 0
