"""Behaviour of the quantizers: codes, gradients, EMA, k-means init, dead codes, FSQ."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from genpipe.models.quantizer import FSQ, VectorQuantizer, build_quantizer

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest


def _grid(b: int = 4, d: int = 8, h: int = 4, w: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, d, h, w, generator=torch.Generator().manual_seed(seed))


def _flat(z: torch.Tensor) -> torch.Tensor:
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])


@pytest.mark.parametrize("kwargs", [{}, {"cosine": True}, {"code_dim": 3}, {"ema": False}])
def test_vq_shapes_and_code_range(kwargs: dict) -> None:
    vq = VectorQuantizer(8, 16, **kwargs)
    z = _grid()
    z_q, codes, loss, stats = vq(z)
    assert z_q.shape == z.shape and codes.shape == (4, 4, 4) and codes.dtype == torch.long
    assert codes.min() >= 0 and codes.max() < 16
    assert loss.ndim == 0 and loss.item() > 0
    assert 1.0 <= stats["perplexity"].item() <= 16.0
    assert 0.0 < stats["usage"].item() <= 1.0


def test_straight_through_gradient_is_identity() -> None:
    vq = VectorQuantizer(8, 16, kmeans_init=False, dead_code_threshold=0)
    z = _grid().requires_grad_(True)
    z_q, _, _, _ = vq(z)
    (z_q * 3.0).sum().backward()
    torch.testing.assert_close(z.grad, torch.full_like(z, 3.0))


def test_projected_codes_pass_gradient_to_input_and_projections() -> None:
    vq = VectorQuantizer(8, 16, code_dim=2)
    z = _grid().requires_grad_(True)
    z_q, _, loss, _ = vq(z)
    (z_q.pow(2).sum() + loss).backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert vq.proj_in.weight.grad.abs().sum() > 0 and vq.proj_out.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("ema", [True, False])
def test_commitment_loss_matches_hand_computation(ema: bool) -> None:
    beta = 0.3
    vq = VectorQuantizer(8, 16, beta=beta, ema=ema, kmeans_init=False, dead_code_threshold=0)
    vq.eval()  # no codebook update, so the codebook used is the one we read
    z = _grid().requires_grad_(True)
    _, codes, loss, _ = vq(z)
    flat = _flat(z.detach())
    nearest = torch.cdist(flat, vq.codebook.detach()).argmin(1)
    assert torch.equal(codes.flatten(), nearest)
    sq = (flat - vq.codebook.detach()[nearest]).pow(2).mean()
    torch.testing.assert_close(loss, (beta if ema else 1 + beta) * sq)
    loss.backward()
    # beta weighs the encoder term only: d/dz = beta * 2 (z - e) / numel
    expected = beta * 2 * (flat - vq.codebook.detach()[nearest]) / flat.numel()
    torch.testing.assert_close(_flat(z.grad), expected)
    if not ema:
        assert vq.codebook.grad.abs().sum() > 0


def test_ema_codebook_is_not_a_parameter_and_eval_does_not_update() -> None:
    vq = VectorQuantizer(8, 16)
    assert not any(p is vq.codebook for p in vq.parameters())
    vq.eval()
    before = vq.codebook.clone()
    vq(_grid())
    assert torch.equal(vq.codebook, before) and not vq.initted


def test_ema_update_moves_codes_toward_assigned_vectors() -> None:
    vq = VectorQuantizer(8, 16, decay=0.5, kmeans_init=False, dead_code_threshold=0)
    z = _grid(b=8)
    flat = _flat(z)
    before = vq.codebook.clone()
    _, codes, _, _ = vq(z)
    codes = codes.flatten()
    used = codes.unique()
    means = torch.stack([flat[codes == k].mean(0) for k in used])
    dist_before = (before[used] - means).norm(dim=1)
    dist_after = (vq.codebook[used] - means).norm(dim=1)
    assert len(used) > 3
    assert (dist_after < dist_before).all()


def test_dead_codes_restart_onto_batch_vectors() -> None:
    vq = VectorQuantizer(8, 8, kmeans_init=False, dead_code_threshold=0.5)
    z = _grid(b=2)
    flat = _flat(z)
    with torch.no_grad():  # codes 4..7 far away and unused: their usage is below the threshold
        vq.codebook[4:] = 100.0
        vq.cluster_size[4:] = 0.0
        vq.embed_sum.copy_(vq.codebook * vq.cluster_size.unsqueeze(1))
    torch.manual_seed(0)
    _, codes, _, _ = vq(z)
    assert (codes < 4).all()
    for k in range(4, 8):
        assert not torch.allclose(vq.codebook[k], torch.full((8,), 100.0))
        assert (vq.codebook[k] - flat).norm(dim=1).min() < 1e-6, f"code {k} not on a batch vector"


@pytest.mark.parametrize("cosine", [False, True])
def test_gradient_trained_codebook_restarts_dead_codes_and_backpropagates(cosine: bool) -> None:
    """ema=False: the restart edits the codebook parameter in place during forward; backward
    must still run (a cosine codebook's normalisation used to need the unedited tensor)."""
    vq = VectorQuantizer(8, 8, ema=False, cosine=cosine, kmeans_init=False, dead_code_threshold=0.5)
    vq.train()
    with torch.no_grad():  # codes 4..7 unused so far: their usage is below the threshold
        vq.cluster_size[4:] = 0.0
    kept = vq.codebook.detach()[:4].clone()
    z = _grid(b=2).requires_grad_(True)
    torch.manual_seed(0)
    z_q, _, loss, _ = vq(z)
    (z_q.pow(2).sum() + loss).backward()
    assert torch.isfinite(vq.codebook.grad).all() and vq.codebook.grad.abs().sum() > 0
    assert z.grad is not None and torch.isfinite(z.grad).all()
    flat = vq._project_flat(z.detach())
    assert torch.equal(vq.codebook.detach()[:4], kept)
    for k in range(4, 8):
        assert (vq.codebook.detach()[k] - flat).norm(dim=1).min() < 1e-6, f"code {k} not restarted"
    assert (vq.cluster_size[4:] == 0.5).all()


def test_restart_is_deterministic_given_torch_rng_state() -> None:
    def run() -> torch.Tensor:
        vq = VectorQuantizer(8, 64, dead_code_threshold=2.0)
        torch.manual_seed(7)
        for s in range(3):
            vq(_grid(seed=s))
        return vq.codebook

    assert torch.equal(run(), run())


def test_kmeans_init_is_seeded_and_leaves_global_rng_alone() -> None:
    z = _grid(b=8)

    def init(global_seed: int, seed: int) -> torch.Tensor:
        torch.manual_seed(global_seed)
        vq = VectorQuantizer(8, 16, seed=seed, dead_code_threshold=0)
        state = torch.get_rng_state()
        vq(z)
        assert torch.equal(torch.get_rng_state(), state)
        assert vq.initted
        return vq.codebook.clone()

    a = init(global_seed=1, seed=3)
    assert torch.equal(a, init(global_seed=2, seed=3))
    assert not torch.equal(a, init(global_seed=1, seed=4))


def test_kmeans_init_fits_the_batch_better_than_random_codes() -> None:
    z = _grid(b=8)
    flat = _flat(z)

    def distortion(vq: VectorQuantizer) -> float:
        return torch.cdist(flat, vq.codebook).min(1).values.pow(2).mean().item()

    km = VectorQuantizer(8, 16, kmeans_iters=10, decay=1.0, dead_code_threshold=0)
    km(z)  # decay=1 freezes the EMA, so the codebook is exactly the k-means result
    rand = VectorQuantizer(8, 16, kmeans_iters=0, decay=1.0, dead_code_threshold=0)
    rand(z)  # zero Lloyd iterations: codes are the seeded sample of batch vectors
    assert distortion(km) < 0.9 * distortion(rand)


def test_cosine_codes_have_unit_norm_after_training() -> None:
    vq = VectorQuantizer(8, 16, cosine=True, dead_code_threshold=1.0)
    torch.manual_seed(0)
    for s in range(3):
        vq(_grid(seed=s))
    torch.testing.assert_close(vq.codebook.norm(dim=1), torch.ones(16))
    torch.testing.assert_close(vq.project(_grid()).norm(dim=1), torch.ones(4, 4, 4))


def test_gradient_trained_cosine_codes_stay_on_the_sphere() -> None:
    vq = VectorQuantizer(8, 16, cosine=True, ema=False, dead_code_threshold=0)
    with torch.no_grad():  # as if optimiser steps had moved the parameter off the sphere
        vq.codebook.mul_(torch.linspace(0.5, 3.0, 16).unsqueeze(1))
    latent = vq.codes_to_latent(torch.arange(16).view(1, 4, 4))
    torch.testing.assert_close(latent.norm(dim=1), torch.ones(1, 4, 4))
    vq.eval()
    z_q, _, _, _ = vq(_grid())
    torch.testing.assert_close(z_q.norm(dim=1), torch.ones(4, 4, 4))


@pytest.mark.parametrize("kwargs", [{}, {"code_dim": 3}, {"cosine": True}])
def test_vq_codes_latent_round_trip(kwargs: dict) -> None:
    vq = VectorQuantizer(8, 32, **kwargs)
    vq(_grid())
    codes = torch.arange(32).view(2, 4, 4)
    latent = vq.codes_to_latent(codes)
    assert latent.shape == (2, vq.code_dim, 4, 4)
    assert torch.equal(vq.latent_to_codes(latent), codes)
    vq.eval()
    z = _grid(seed=1)
    assert torch.equal(vq.latent_to_codes(vq.project(z)), vq(z)[1])


def test_fsq_codes_in_range_and_round_trip() -> None:
    fsq = FSQ(4, [8, 5, 5, 5])
    assert fsq.codebook_size == 1000
    z = _grid(d=4) * 3
    z_q, codes, loss, stats = fsq(z)
    assert z_q.shape == z.shape and loss.item() == 0.0
    assert codes.min() >= 0 and codes.max() < 1000 and stats["usage"] > 0
    all_codes = torch.arange(1000).view(10, 10, 10)
    assert torch.equal(fsq.latent_to_codes(fsq.codes_to_latent(all_codes)), all_codes)
    assert torch.equal(fsq.latent_to_codes(fsq.project(z)), codes)
    torch.testing.assert_close(fsq.codes_to_latent(codes), z_q)  # no projection: dim == 4


def test_fsq_gradient_and_projection() -> None:
    fsq = FSQ(8, [5, 5, 3])
    z = _grid().requires_grad_(True)
    z_q, codes, _, _ = fsq(z)
    assert z_q.shape == z.shape and codes.max() < 75
    z_q.pow(2).sum().backward()
    assert z.grad.abs().sum() > 0


def test_build_quantizer() -> None:
    assert isinstance(build_quantizer("vq", dim=8, codebook_size=4), VectorQuantizer)
    assert isinstance(build_quantizer("fsq", dim=3, levels=[3, 3, 3]), FSQ)
    with pytest.raises(ValueError, match="unknown quantizer kind 'rvq'"):
        build_quantizer("rvq", dim=8)


def test_reduce_hook_sees_batch_statistics() -> None:
    seen: list[torch.Size] = []

    def reduce(t: torch.Tensor) -> torch.Tensor:
        seen.append(t.shape)
        return t * 2  # as if a second rank had the same batch

    vq = VectorQuantizer(8, 16, kmeans_init=False, decay=0.0, dead_code_threshold=0)
    vq.reduce = reduce
    _, codes, _, _ = vq(_grid())
    assert seen == [torch.Size([16]), torch.Size([16, 8])]
    counts = torch.bincount(codes.flatten(), minlength=16).float()
    torch.testing.assert_close(vq.cluster_size, 2 * counts)


def test_quantizer_runs_under_bf16_autocast() -> None:
    vq = VectorQuantizer(8, 16, code_dim=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = F.conv2d(_grid(), torch.randn(8, 8, 1, 1))
        z_q, codes, loss, _ = vq(z)
    assert loss.dtype == torch.float32 and codes.max() < 16
