"""ARPrior: teacher forcing vs KV cache, seeded sampling, CFG, log-probabilities."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from genpipe.models.priors import ar as transformer
from genpipe.models.priors.ar import ARPrior
from genpipe.models.priors.transformer import (
    KVCache,
    apply_rope,
    filter_logits,
    rope2d_tables,
    sample_categorical,
)

K, GRID, CLASSES = 32, (3, 4), 5


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest


def make(pos: str = "rope2d", seed: int = 0) -> ARPrior:
    torch.manual_seed(seed)
    model = ARPrior(K, GRID, CLASSES, dim=32, depth=2, heads=2, pos=pos).eval()
    # larger weights than GPT init so logits differ between positions, classes and codes
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0)
    return model


def data(batch: int = 6, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, K, (batch, *GRID), generator=g)
    labels = torch.randint(0, CLASSES, (batch,), generator=g)
    return codes, labels


@pytest.mark.parametrize("pos", ["rope2d", "learned"])
def test_cached_logits_match_teacher_forcing(pos):
    model = make(pos)
    codes, labels = data()
    full = model(codes, labels)
    assert full.shape == (6, 12, K)
    cache = KVCache(model.seq_len)
    flat = codes.reshape(6, -1)
    steps = [model._trunk(model._class_tokens(labels, None), 0, cache)]
    for i in range(1, model.seq_len):
        steps.append(model._trunk(model.tok_emb(flat[:, i - 1 : i]), i, cache))
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_logits_are_causal():
    model = make()
    codes, labels = data()
    changed = codes.clone().reshape(6, -1)
    changed[:, 7] = (changed[:, 7] + 1) % K
    a, b = model(codes, labels), model(changed, labels)
    torch.testing.assert_close(a[:, :8], b[:, :8])  # logit i sees codes < i only
    assert not torch.allclose(a[:, 8:], b[:, 8:])


@pytest.mark.parametrize("pos", ["rope2d", "learned"])
@pytest.mark.parametrize("cfg", [1.0, 2.5])
def test_sampling_with_and_without_cache_matches_step_by_step(pos, cfg, monkeypatch):
    """At every step of the same prefix both paths give the same distribution and draw the
    same number of uniforms, for every seed. Draws themselves are not compared: the paths
    sum in different orders (~1e-6 apart), so a uniform within that of a CDF step may fall
    either way (seed 3 did once in 240 draws)."""
    model = make(pos)
    labels = torch.arange(CLASSES).repeat(4)
    kw = dict(temperature=1.0, top_k=20, cfg_scale=cfg)
    draw = transformer.sample_categorical

    def run(seed: int, use_cache: bool, forced: list[torch.Tensor] | None):
        """Sample, recording each step's probabilities; `forced` replaces the draws (after
        drawing, so the generator advances as usual) to keep the prefix of another run."""
        seen, draws = [], []

        def recording(probs, generator):
            drawn = draw(probs, generator)
            drawn = forced[len(seen)] if forced is not None else drawn
            seen.append(probs)
            draws.append(drawn)
            return drawn

        monkeypatch.setattr(transformer, "sample_categorical", recording)
        g = torch.Generator().manual_seed(seed)
        codes = model.sample(labels, g, use_cache=use_cache, **kw)
        return codes, seen, draws, g.get_state()

    for seed in range(6):
        cached, probs_c, draws_c, state_c = run(seed, True, None)
        uncached, probs_u, _, state_u = run(seed, False, draws_c)
        assert cached.shape == (20, *GRID) and cached.dtype == torch.long
        assert cached.min() >= 0 and cached.max() < K
        assert torch.equal(cached, uncached)  # the forced prefix was followed
        assert len(probs_c) == len(probs_u) == model.seq_len
        for i, (pc, pu) in enumerate(zip(probs_c, probs_u)):
            torch.testing.assert_close(pc, pu, atol=1e-5, rtol=1e-5, msg=f"step {i}")
        assert torch.equal(state_c, state_u), "the two paths consume the generator differently"


def test_sampling_determinism_under_seed():
    model = make()
    labels = torch.arange(CLASSES).repeat(4)
    a = model.sample(labels, torch.Generator().manual_seed(0), cfg_scale=2.0)
    b = model.sample(labels, torch.Generator().manual_seed(0), cfg_scale=2.0)
    c = model.sample(labels, torch.Generator().manual_seed(1), cfg_scale=2.0)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_sampling_ignores_global_rng():
    model = make()
    labels = torch.arange(CLASSES)
    torch.manual_seed(0)
    a = model.sample(labels, torch.Generator().manual_seed(5))
    torch.manual_seed(1)
    b = model.sample(labels, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_cfg_scale_one_is_conditional_and_other_scales_differ():
    model = make()
    codes, labels = data()
    cond = model(codes, labels).log_softmax(-1)
    expected = cond.gather(-1, codes.reshape(6, -1, 1)).squeeze(-1).sum(1)
    torch.testing.assert_close(model.log_prob(codes, labels, cfg_scale=1.0), expected)
    assert not torch.allclose(model.log_prob(codes, labels, cfg_scale=3.0), expected)
    # cfg = 0 is the unconditional model: the label must not matter
    other = (labels + 1) % CLASSES
    torch.testing.assert_close(
        model.log_prob(codes, labels, cfg_scale=0.0), model.log_prob(codes, other, cfg_scale=0.0)
    )


def test_cfg_scale_one_sampling_never_uses_the_null_class():
    model = make()
    labels = torch.arange(CLASSES)
    a = model.sample(labels, torch.Generator().manual_seed(0), cfg_scale=1.0)
    with torch.no_grad():
        model.class_emb.weight[CLASSES] += 100.0  # corrupt the null class only
    b = model.sample(labels, torch.Generator().manual_seed(0), cfg_scale=1.0)
    c = model.sample(labels, torch.Generator().manual_seed(0), cfg_scale=2.0)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_sampling_works_under_deterministic_algorithms():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        model = make()
        a = model.sample(torch.arange(3), torch.Generator().manual_seed(0), cfg_scale=2.0)
        b = model.sample(torch.arange(3), torch.Generator().manual_seed(0), cfg_scale=2.0)
        loss = model.train().loss(a, torch.arange(3), torch.Generator().manual_seed(0))
        loss.backward()
    finally:
        torch.use_deterministic_algorithms(before)
    assert torch.equal(a, b)


def test_cfg_logit_combination():
    model = make()
    codes, labels = data()
    cond = model(codes, labels)
    uncond = model(codes, labels, drop_mask=torch.ones(6, dtype=torch.bool))
    guided = (uncond + 2.0 * (cond - uncond)).log_softmax(-1)
    expected = guided.gather(-1, codes.reshape(6, -1, 1)).squeeze(-1).sum(1)
    torch.testing.assert_close(model.log_prob(codes, labels, cfg_scale=2.0), expected)


def test_log_prob_is_sum_of_per_position_log_softmax_at_sampled_codes():
    model = make()
    labels = torch.arange(CLASSES)
    codes = model.sample(labels, torch.Generator().manual_seed(2))
    logits = model(codes, labels)
    flat = codes.reshape(CLASSES, -1)
    by_hand = torch.stack(
        [
            sum(F.log_softmax(logits[b, i], -1)[flat[b, i]] for i in range(flat.shape[1]))
            for b in range(CLASSES)
        ]
    )
    lp = model.log_prob(codes, labels)
    assert lp.shape == (CLASSES,) and (lp < 0).all()
    torch.testing.assert_close(lp, by_hand)
    lp.sum().backward()  # differentiable, for policy gradients
    assert model.head.weight.grad is not None
    bits = model.nll_bits_per_code(codes, labels)
    assert math.isclose(bits, -lp.sum().item() / flat.numel() / math.log(2), rel_tol=1e-5)
    # in uneven batches (memory at MNIST size), every code still counts once
    assert math.isclose(model.nll_bits_per_code(codes, labels, batch_size=3), bits, rel_tol=1e-5)


def test_temperature_sharpens_and_log_prob_follows_it():
    model = make()
    codes, labels = data()
    cold = model.log_prob(codes, labels, temperature=0.5)
    logits = model(codes, labels) / 0.5
    expected = logits.log_softmax(-1).gather(-1, codes.reshape(6, -1, 1)).squeeze(-1).sum(1)
    torch.testing.assert_close(cold, expected)


def test_filter_logits_top_k_and_top_p():
    logits = torch.tensor([[3.0, 1.0, 2.0, 0.0]])
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, True, False, True]]
    probs = logits.softmax(-1)  # 0.64, 0.09, 0.24, 0.03
    assert probs[0, 0] < 0.7 < probs[0, 0] + probs[0, 2]
    kept = ~torch.isinf(filter_logits(logits, top_p=0.7))
    assert kept.tolist() == [[True, False, True, False]]
    assert (~torch.isinf(filter_logits(logits, top_p=0.5))).sum() == 1  # best always kept


def test_sample_categorical_follows_probabilities():
    probs = torch.tensor([[0.0, 0.25, 0.75, 0.0]]).repeat(20000, 1)
    draws = sample_categorical(probs, torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=4).float() / len(draws)
    assert counts[0] == 0 and counts[3] == 0
    assert abs(counts[2] - 0.75) < 0.02


def test_rope2d_scores_depend_on_2d_offset_only():
    cos, sin = rope2d_tables((4, 4), head_dim=8)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, 8, generator=g), torch.randn(1, 1, 1, 8, generator=g)

    def score(cell_q: int, cell_k: int) -> float:
        rq = apply_rope(q, cos[cell_q : cell_q + 1], sin[cell_q : cell_q + 1])
        rk = apply_rope(k, cos[cell_k : cell_k + 1], sin[cell_k : cell_k + 1])
        return (rq * rk).sum().item()

    # cells (0,0)->(1,1) and (2,1)->(3,2): same offset; (0,3)->(1,0) is the raster neighbour
    # of (0,0)->(1,1) (same 1-D distance 5 in both) but a different 2-D offset
    assert math.isclose(score(0, 5), score(9, 14), rel_tol=1e-5)
    assert not math.isclose(score(0, 5), score(3, 4), rel_tol=1e-3)


def test_class_dropout_mask_rate_and_null_class():
    model = ARPrior(K, GRID, CLASSES, dim=32, depth=1, heads=2, class_dropout=0.3)
    mask = model.drop_labels(torch.zeros(10000, dtype=torch.long), torch.Generator().manual_seed(0))
    assert abs(mask.float().mean().item() - 0.3) < 0.02
    assert model.class_emb.num_embeddings == CLASSES + 1


def test_training_loss_decreases_on_a_fixed_batch():
    torch.manual_seed(0)
    model = ARPrior(K, GRID, CLASSES, dim=32, depth=2, heads=2)
    codes, labels = data(16)
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = model.loss(codes, labels, g).item()
    assert abs(first - math.log(K)) < 0.3  # near uniform at init
    for _ in range(60):
        loss = model.loss(codes, labels, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


@pytest.mark.parametrize(
    "kwargs",
    [dict(pos="alibi"), dict(dim=30, heads=4), dict(dim=24, heads=4), dict(class_dropout=1.0)],
)
def test_bad_construction_raises(kwargs):
    args = dict(dim=32, heads=2) | kwargs
    with pytest.raises(ValueError):
        ARPrior(K, GRID, CLASSES, depth=1, **args)


def test_bad_sampling_arguments_raise():
    model = make()
    labels = torch.arange(2)
    with pytest.raises(ValueError, match="cfg_scale"):
        model.sample(labels, torch.Generator(), cfg_scale=-1.0)
    with pytest.raises(ValueError, match="temperature"):
        model.sample(labels, torch.Generator(), temperature=0.0)
    with pytest.raises(ValueError, match="expected 12 codes"):
        model(torch.zeros(2, 5, dtype=torch.long), labels)
