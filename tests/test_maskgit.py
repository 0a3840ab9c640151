"""MaskGITPrior: masking schedules, training on a toy task, parallel decoding, CFG, RL
log-probabilities of decoding trajectories."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from genpipe.models.priors.maskgit import MaskGITPrior, masking_schedule

K, GRID, CLASSES = 16, (3, 4), 4
L = GRID[0] * GRID[1]

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest


def make(pos: str = "learned", seed: int = 0, scale: float = 4.0) -> MaskGITPrior:
    torch.manual_seed(seed)
    model = MaskGITPrior(K, GRID, CLASSES, dim=32, depth=2, heads=2, pos=pos).eval()
    # larger weights than GPT init so logits differ between cells, classes and codes
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
    return model


def data(batch: int = 6, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, K, (batch, *GRID), generator=g)
    labels = torch.randint(0, CLASSES, (batch,), generator=g)
    return codes, labels


@pytest.mark.parametrize(("cells", "steps"), [(16, 8), (16, 12), (49, 8), (49, 12), (12, 12)])
def test_schedule_follows_cosine_and_unmasks_everything(cells, steps):
    left = masking_schedule(cells, steps)
    assert len(left) == steps and left[-1] == 0
    before = [cells, *left[:-1]]
    assert all(b > a for b, a in zip(before, left, strict=True))  # every step fixes a cell
    cosine = [math.floor(cells * math.cos(math.pi / 2 * t / steps)) for t in range(1, steps + 1)]
    # the cosine count, except where it would fix nothing or leave a later step nothing to fix
    for t, (got, want) in enumerate(zip(left, cosine, strict=True), start=1):
        assert got == min(max(want, steps - t), before[t - 1] - 1)
    if cells == 49 and steps == 8:
        assert left == cosine  # a grid this size needs no correction at all


def test_schedule_rejects_more_steps_than_cells():
    with pytest.raises(ValueError, match="steps must be in"):
        masking_schedule(4, 5)


@pytest.mark.parametrize("pos", ["learned", "rope2d"])
@pytest.mark.parametrize("cfg", [1.0, 2.0])
def test_trajectory_fixes_each_cell_once_on_schedule(pos, cfg):
    model = make(pos)
    labels = torch.arange(CLASSES).repeat(3)
    steps = 6
    traj = model.sample_trajectory(labels, torch.Generator().manual_seed(0), steps, cfg_scale=cfg)
    b = len(labels)
    assert traj.inputs.shape == (steps, b, L) and traj.fixed.shape == (steps, b, L)
    assert traj.codes.dtype == torch.long and traj.logp.shape == (b, steps)
    assert traj.codes.min() >= 0 and traj.codes.max() < K  # never the mask token
    assert torch.equal(traj.fixed.sum(0), torch.ones(b, L, dtype=torch.long))
    left = torch.tensor([L, *masking_schedule(L, steps)])
    masked = (traj.inputs == model.mask_token).sum(2)  # (T, B) masked cells seen at each step
    assert torch.equal(masked, left[:-1, None].expand(steps, b))
    for t in range(steps):  # a step sees exactly the cells fixed before it, with their codes
        seen = traj.fixed[:t].any(0)
        assert torch.equal(traj.inputs[t] != model.mask_token, seen)
        assert torch.equal(traj.inputs[t][seen], traj.codes[seen])
    samples = model.sample(labels, torch.Generator().manual_seed(0), cfg_scale=cfg, steps=steps)
    assert samples.shape == (b, *GRID) and torch.equal(samples.reshape(b, L), traj.codes)


def test_sampling_determinism_under_seed_and_independent_of_global_rng():
    model = make()
    labels = torch.arange(CLASSES).repeat(4)
    torch.manual_seed(0)
    a = model.sample(labels, torch.Generator().manual_seed(0), cfg_scale=2.0)
    torch.manual_seed(1)
    b = model.sample(labels, torch.Generator().manual_seed(0), cfg_scale=2.0)
    c = model.sample(labels, torch.Generator().manual_seed(1), cfg_scale=2.0)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_training_is_deterministic_under_seed():
    codes, labels = data(batch=64)
    losses = []
    for i in range(2):
        model = make().train()
        torch.manual_seed(10 + i)  # the global RNG must play no part
        losses.append(model.loss(codes, labels, torch.Generator().manual_seed(3)))
        losses[-1].backward()
    assert torch.equal(losses[0], losses[1])
    other = make().train().loss(codes, labels, torch.Generator().manual_seed(4))
    assert not torch.equal(losses[0], other)


def test_cfg_scale_one_is_the_conditional_path():
    model = make()
    labels = torch.arange(CLASSES)
    a = model.sample(labels, torch.Generator().manual_seed(0), cfg_scale=1.0)
    with torch.no_grad():
        model.class_emb.weight[CLASSES] += 100.0  # corrupt the null class only
    b = model.sample(labels, torch.Generator().manual_seed(0), cfg_scale=1.0)
    c = model.sample(labels, torch.Generator().manual_seed(0), cfg_scale=2.0)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_guided_logits_combine_conditional_and_null_class():
    model = make()
    codes, labels = data()
    inputs = codes.reshape(6, L).clone()
    inputs[:, ::2] = model.mask_token
    cond = model(inputs, labels)
    uncond = model(inputs, labels, drop_mask=torch.ones(6, dtype=torch.bool))
    torch.testing.assert_close(model.guided_logits(inputs, labels, 1.0), cond)
    torch.testing.assert_close(
        model.guided_logits(inputs, labels, 2.5), uncond + 2.5 * (cond - uncond)
    )


def test_logits_are_bidirectional():
    model = make()
    codes, labels = data()
    changed = codes.clone().reshape(6, L)
    changed[:, -1] = (changed[:, -1] + 1) % K
    a, b = model(codes, labels), model(changed, labels)
    assert not torch.allclose(a[:, 0], b[:, 0])  # the first cell sees the last one


def test_loss_is_cross_entropy_on_the_masked_cells_only():
    model = make()
    codes, labels = data()
    loss = model.loss(codes, labels, torch.Generator().manual_seed(7))  # eval: no class dropout
    mask = model.random_mask(6, torch.Generator().manual_seed(7))
    assert mask.any(1).all()
    logits = model(codes.reshape(6, L).masked_fill(mask, model.mask_token), labels)
    expected = F.cross_entropy(logits[mask], codes.reshape(6, L)[mask])
    torch.testing.assert_close(loss, expected)


def test_training_masks_follow_the_cosine_schedule():
    model = make()
    counts = model.random_mask(20000, torch.Generator().manual_seed(0)).sum(1).float()
    assert counts.min() >= 1 and counts.max() <= L
    # E[ceil(L cos(pi/2 u))] = L * 2/pi plus the rounding up, about +0.5 cells
    assert abs(counts.mean().item() - (L * 2 / math.pi + 0.5)) < 0.1
    # cosine masks are mostly high: P(count > L/2) = P(u < 2/3) = 2/3
    assert abs((counts > L / 2).float().mean().item() - 2 / 3) < 0.02


@pytest.mark.parametrize(("cfg", "temperature", "top_p"), [(1.0, 1.0, None), (2.0, 0.7, 0.9)])
def test_log_prob_matches_sampling_and_an_explicit_loop(cfg, temperature, top_p):
    model = make()
    labels = torch.arange(CLASSES).repeat(2)
    steps, kw = 5, dict(cfg_scale=cfg, temperature=temperature, top_p=top_p)
    traj = model.sample_trajectory(labels, torch.Generator().manual_seed(2), steps, **kw)
    recomputed = model.log_prob(traj, labels, **kw)
    assert recomputed.shape == (len(labels),) and (recomputed < 0).all()
    torch.testing.assert_close(recomputed, traj.logp.sum(1))
    torch.testing.assert_close(model.step_log_probs(traj, labels, **kw), traj.logp)
    by_hand = torch.zeros(len(labels))
    for t in range(steps):
        x = traj.inputs[t]
        cond = model(x, labels)
        uncond = model(x, labels, drop_mask=torch.ones(len(labels), dtype=torch.bool))
        logits = (uncond + cfg * (cond - uncond)) / temperature
        if top_p is not None:  # the nucleus, as sampling used it
            probs, order = logits.softmax(-1).sort(-1, descending=True)
            sorted_outside = probs.cumsum(-1) - probs > top_p
            outside = torch.zeros_like(sorted_outside).scatter(-1, order, sorted_outside)
            logits = logits.masked_fill(outside, float("-inf"))
        logp = logits.log_softmax(-1)
        for b in range(len(labels)):
            for i in range(L):
                if traj.fixed[t, b, i]:
                    by_hand[b] += logp[b, i, traj.codes[b, i]]
    torch.testing.assert_close(recomputed, by_hand)
    recomputed.sum().backward()  # differentiable, for policy-gradient ratios
    assert model.head.weight.grad is not None and model.head.weight.grad.abs().sum() > 0


def test_log_prob_changes_with_the_weights():
    model, other = make(seed=0), make(seed=1)
    labels = torch.arange(CLASSES)
    traj = model.sample_trajectory(labels, torch.Generator().manual_seed(0), cfg_scale=2.0)
    assert not torch.allclose(other.log_prob(traj, labels, cfg_scale=2.0), traj.logp.sum(1))


def test_nll_bound_is_uniform_for_a_blank_head_and_deterministic():
    model = make()
    codes, labels = data()
    with torch.no_grad():
        model.head.weight.zero_()
    assert math.isclose(model.nll_bits_per_code(codes, labels), math.log2(K), rel_tol=1e-6)
    trained = make()
    assert trained.nll_bits_per_code(codes, labels) == trained.nll_bits_per_code(codes, labels)
    assert trained.nll_bits_per_code(codes, labels) != trained.nll_bits_per_code(
        codes, labels, seed=1
    )


def test_bad_arguments_name_the_problem():
    with pytest.raises(ValueError, match="pos must be one of"):
        MaskGITPrior(K, GRID, CLASSES, dim=32, depth=1, heads=2, pos="sinusoid")
    with pytest.raises(ValueError, match="divisible by heads"):
        MaskGITPrior(K, GRID, CLASSES, dim=30, depth=1, heads=4)
    model = make()
    with pytest.raises(ValueError, match="expected 12 codes"):
        model(torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="steps must be in"):
        model.sample(torch.arange(2), torch.Generator(), steps=13)
    with pytest.raises(ValueError, match="temperature"):
        model.sample(torch.arange(2), torch.Generator(), temperature=0.0)


def toy_task(n: int, g: torch.Generator):
    """Each class has one fixed code pattern; every sample of class c is exactly pattern c."""
    patterns = torch.randint(0, K, (CLASSES, L), generator=g)
    labels = torch.randint(0, CLASSES, (n,), generator=g)
    return patterns, patterns[labels], labels


def test_training_learns_a_toy_task_and_samples_the_class_pattern():
    g = torch.Generator().manual_seed(0)
    patterns, codes, labels = toy_task(512, g)
    torch.manual_seed(0)
    model = MaskGITPrior(K, GRID, CLASSES, dim=32, depth=2, heads=2)
    before = model.nll_bits_per_code(codes, labels)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    model.train()
    for _ in range(100):
        idx = torch.randint(0, len(codes), (64,), generator=g)
        loss = model.loss(codes[idx], labels[idx], g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.2 * first, (first, last)
    assert model.nll_bits_per_code(codes, labels) < 0.2 * before
    want = torch.arange(CLASSES).repeat_interleave(25)
    samples = model.sample(want, torch.Generator().manual_seed(1), cfg_scale=2.0).reshape(-1, L)
    hamming = (samples[:, None] != patterns[None]).sum(2)  # (N, classes)
    consistency = (hamming.argmin(1) == want).float().mean().item()
    cells = (samples == patterns[want]).float().mean().item()
    assert consistency >= 0.98, consistency
    assert cells >= 0.9, cells  # cells equal to the requested class's pattern


def test_nll_bound_in_one_pass_matches_a_loop_over_every_k():
    """The one-pass estimate (each row one k, every k equally often) against the definition's
    loop over k (one random k-cell mask per row, mean CE per masked cell, averaged over k), on
    a model whose CE depends on k: the class is hidden, so only unmasked cells tell the
    pattern."""
    g = torch.Generator().manual_seed(0)
    _, codes, _ = toy_task(40 * L, g)
    labels = torch.zeros(len(codes), dtype=torch.long)
    torch.manual_seed(0)
    model = MaskGITPrior(K, GRID, CLASSES, dim=32, depth=2, heads=2).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        idx = torch.randint(0, len(codes), (64,), generator=g)
        opt.zero_grad()
        model.loss(codes[idx], labels[idx], g).backward()
        opt.step()
    model.eval()
    flat, per_k = codes.reshape(-1, L), []
    with torch.no_grad():
        for k in range(1, L + 1):
            mask = torch.rand(len(flat), L, generator=g).argsort(1).argsort(1) < k
            logits = model(flat.masked_fill(mask, model.mask_token), labels)
            ce = F.cross_entropy(logits.transpose(1, 2), flat, reduction="none")
            per_k.append(((ce * mask).sum() / mask.sum()).item() / math.log(2))
    assert per_k[-1] > per_k[0] + 0.5, per_k  # a bound that weighs k wrongly would show
    one_pass = model.nll_bits_per_code(codes, labels)
    assert abs(one_pass - sum(per_k) / L) < 0.05 * sum(per_k) / L, (one_pass, per_k)
    # in batches of rows, the last one short: the same figure
    assert math.isclose(model.nll_bits_per_code(codes, labels, batch_size=37), one_pass)
