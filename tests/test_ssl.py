"""SimCLR loss, patch masking, MAE loss and the seeded batch augmentations."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision import tv_tensors

from genpipe.models.autoencoder import Encoder
from genpipe.models.ssl import (
    MAE,
    SimCLR,
    encoder_features,
    mae_loss,
    nt_xent,
    random_patch_mask,
    simclr_augment,
)


@pytest.fixture(autouse=True)
def _deterministic():
    before = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before, warn_only=warn_only)


def _tiny_encoder(out_dim: int = 8) -> Encoder:
    torch.manual_seed(0)
    return Encoder(1, (8, 16), 1, out_dim)


def _digits_like(b: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_nt_xent_matches_hand_computed_value():
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z2 = torch.tensor([[3.0, 4.0], [0.0, -2.0]])
    t = 0.5
    # Unit vectors of the 4 views, in the order [z1; z2]; view i's partner is (i + 2) % 4.
    views = [(1.0, 0.0), (0.0, 1.0), (0.6, 0.8), (0.0, -1.0)]

    def sim(i: int, k: int) -> float:
        return (views[i][0] * views[k][0] + views[i][1] * views[k][1]) / t

    expected = 0.0
    for i in range(4):
        denom = sum(math.exp(sim(i, k)) for k in range(4) if k != i)
        expected += -math.log(math.exp(sim(i, (i + 2) % 4)) / denom)
    expected /= 4
    assert nt_xent(z1, z2, t).item() == pytest.approx(expected, rel=1e-6)


def test_nt_xent_rewards_matching_views_and_ignores_scale():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(16, 8, generator=g)
    matched = nt_xent(z, z + 0.01 * torch.randn(16, 8, generator=g), 0.2)
    shuffled = nt_xent(z, z.roll(1, dims=0), 0.2)
    assert matched < shuffled
    assert nt_xent(z, 5 * z, 0.2).item() == pytest.approx(nt_xent(z, z, 0.2).item(), rel=1e-5)
    with pytest.raises(ValueError):
        nt_xent(z, z[:4], 0.2)


@pytest.mark.parametrize(
    ("num_patches", "ratio"), [(16, 0.0), (16, 0.5), (16, 0.75), (7, 0.3), (9, 1.0)]
)
def test_patch_mask_has_exact_count_per_row(num_patches, ratio):
    mask = random_patch_mask(32, num_patches, ratio, torch.Generator().manual_seed(1))
    assert mask.dtype == torch.bool and mask.shape == (32, num_patches)
    assert (mask.sum(dim=1) == round(ratio * num_patches)).all()


def test_patch_mask_is_seeded():
    def draw(seed: int) -> torch.Tensor:
        return random_patch_mask(8, 16, 0.5, torch.Generator().manual_seed(seed))

    assert torch.equal(draw(3), draw(3))
    assert not torch.equal(draw(3), draw(4))
    assert len({tuple(row.tolist()) for row in draw(3)}) > 1  # rows are drawn independently


def test_mae_loss_only_sees_masked_patches():
    g = torch.Generator().manual_seed(0)
    target = torch.rand(4, 1, 8, 8, generator=g)
    pred = torch.rand(4, 1, 8, 8, generator=g)
    mask = random_patch_mask(4, 16, 0.5, g)
    pix = mask.view(4, 1, 4, 4).repeat_interleave(2, 2).repeat_interleave(2, 3)
    base = mae_loss(pred, target, mask, 2)

    changed_visible = torch.where(pix, target, target + 10.0)
    assert mae_loss(pred, changed_visible, mask, 2).item() == pytest.approx(base.item())
    changed_masked = torch.where(pix, target + 10.0, target)
    assert mae_loss(pred, changed_masked, mask, 2).item() > base.item() + 1.0
    expected = ((pred - target)[pix.expand_as(target)] ** 2).mean()
    assert base.item() == pytest.approx(expected.item(), rel=1e-6)


def test_mae_hides_masked_pixels_from_encoder_and_trains():
    model = MAE(_tiny_encoder(), feature_dim=8, in_channels=1, patch_size=2, mask_ratio=0.5)
    x = _digits_like()
    mask = random_patch_mask(6, 16, 0.5, torch.Generator().manual_seed(0))
    pix = mask.view(6, 1, 4, 4).repeat_interleave(2, 2).repeat_interleave(2, 3)
    pred = model.predict(x, mask)
    assert pred.shape == x.shape
    # Changing what sits under the mask cannot change the prediction.
    assert torch.equal(model.predict(torch.where(pix, 1 - x, x), mask), pred)

    loss_a = model(x, torch.Generator().manual_seed(5))
    loss_b = model(x, torch.Generator().manual_seed(5))
    assert torch.equal(loss_a, loss_b) and loss_a.ndim == 0
    loss_a.backward()
    assert model.mask_token.grad is not None and model.mask_token.grad.abs().sum() > 0
    with pytest.raises(ValueError):
        model(torch.rand(2, 1, 7, 7), torch.Generator())


def test_simclr_forward_and_features():
    model = SimCLR(_tiny_encoder(), feature_dim=8, proj_hidden=16, proj_dim=4, temperature=0.2)
    x = _digits_like()
    loss = model(x, x.flip(-1))
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in model.encoder.parameters())
    assert encoder_features(model.encoder, x).shape == (6, 8)


def test_augment_is_seeded_per_sample_and_in_range():
    x = _digits_like(b=1).expand(8, 1, 8, 8)  # one image repeated: views must still differ

    def views(seed: int) -> torch.Tensor:
        aug = simclr_augment(torch.Generator().manual_seed(seed), elastic_alpha=0.5)
        return aug(x)

    out = views(0)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert torch.equal(out, views(0))
    assert not torch.equal(out, views(1))
    assert not torch.allclose(out[0], out[1])


def test_augment_without_randomness_is_identity():
    aug = simclr_augment(
        torch.Generator().manual_seed(0),
        scale=(1.0, 1.0),
        ratio=(1.0, 1.0),
        degrees=0.0,
        translate=0.0,
        noise_std=0.0,
    )
    x = _digits_like()
    torch.testing.assert_close(aug(x), x, atol=1e-5, rtol=0)


def test_augment_accepts_single_images_tv_tensors_and_passes_labels_through():
    aug = simclr_augment(torch.Generator().manual_seed(0))
    single = aug(_digits_like(b=1)[0])
    assert single.shape == (1, 8, 8)
    labels = torch.arange(6)
    wrapped, out_labels = aug(tv_tensors.Image(_digits_like()), labels)
    assert isinstance(wrapped, tv_tensors.Image) and wrapped.shape == (6, 1, 8, 8)
    assert torch.equal(out_labels, labels)
