"""The reward-weighted regression bench (bench/rl_reward_weighted.py): each round's weights
spend the KL asked for, and the weighted loss is the prior's own training loss reweighted."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from bench.rl_reward_weighted import round_weights, weighted_loss
from genpipe.models.priors import prior_kind
from genpipe.models.priors.ar import ARPrior
from genpipe.models.priors.diffusion import Denoiser

CLASSES, GRID = 3, (2, 2)


def test_round_weights_spend_delta_within_each_class():
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(300, generator=g)
    labels = torch.arange(300) % CLASSES
    w, alpha = round_weights(rewards, labels, 0.2)
    kls = []
    for c in range(CLASSES):
        wc = w[labels == c].double() * CLASSES  # the class's weights, summing to 1
        assert float(wc.sum()) == pytest.approx(1.0)
        kls.append(float((wc * (wc * len(wc)).log()).sum()))
        # softmax(alpha * r): higher reward, higher weight
        order = rewards[labels == c].argsort()
        assert bool((wc[order].diff() > 0).all())
    assert sum(kls) / CLASSES == pytest.approx(0.2, abs=1e-6)
    assert alpha > 0


def _randomised(net: torch.nn.Module) -> torch.nn.Module:
    """Every weight drawn at random, so that a zero-initialised output cannot hide a loss."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return net.requires_grad_(False)


def _gen(kind: str) -> SimpleNamespace:
    if kind == "ar":
        return SimpleNamespace(
            kind_of=prior_kind("ar"),
            prior=_randomised(ARPrior(8, GRID, CLASSES, dim=16, depth=1, heads=2)),
            formulation=None,
        )
    net = _randomised(Denoiser(4, GRID, CLASSES, dim=16, depth=1, heads=2))
    return SimpleNamespace(
        kind_of=prior_kind("diffusion"), prior=net, formulation={"name": "flow_matching"}
    )


def _batch(kind: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    labels = torch.arange(n) % CLASSES
    if kind == "ar":
        return torch.randint(0, 8, (n, *GRID), generator=g), labels
    return torch.randn(n, 4, *GRID, generator=g), labels


@pytest.mark.parametrize("kind", ["ar", "diffusion"])
def test_equal_weights_give_the_training_loss(kind):
    """Weights 1/N give the very loss the prior stage trains on, with the same random draws
    (time, noise, class dropout), in train mode."""
    gen = _gen(kind)
    gen.prior.train()
    x, y = _batch(kind, 12)
    w = torch.full((12,), 1 / 12)
    got = weighted_loss(gen, x, y, w, torch.Generator().manual_seed(3))  # type: ignore[arg-type]
    settings = gen.formulation
    want = gen.kind_of.loss(gen.prior, settings, x, y, torch.Generator().manual_seed(3))
    assert float(got) == pytest.approx(float(want), rel=1e-5)


def test_ar_weights_select_samples():
    """All the weight on one grid gives that grid's mean next-code cross-entropy (eval mode:
    no random draws)."""
    gen = _gen("ar")
    gen.prior.eval()
    x, y = _batch("ar", 6)
    for i in (0, 4):
        w = torch.zeros(6)
        w[i] = 1.0
        got = weighted_loss(gen, x, y, w, torch.Generator())  # type: ignore[arg-type]
        logits = gen.prior(x[i : i + 1], y[i : i + 1])[0]  # (L, K): that grid's next-code logits
        want = F.cross_entropy(logits, x[i].flatten())
        assert float(got) == pytest.approx(float(want), rel=1e-5)


def test_diffusion_weights_select_samples():
    """Zero weight on a sample: its loss does not count (changing its data changes nothing)."""
    gen = _gen("diffusion")
    gen.prior.eval()
    x, y = _batch("diffusion", 6)
    w = torch.tensor([0.5, 0.5, 0.0, 0.0, 0.0, 0.0])
    a = weighted_loss(gen, x, y, w, torch.Generator().manual_seed(4))  # type: ignore[arg-type]
    x2 = x.clone()
    x2[2:] += 5.0
    b = weighted_loss(gen, x2, y, w, torch.Generator().manual_seed(4))  # type: ignore[arg-type]
    even = torch.full((6,), 1 / 6)
    c = weighted_loss(gen, x2, y, even, torch.Generator().manual_seed(4))  # type: ignore[arg-type]
    assert float(a) == pytest.approx(float(b), rel=1e-6)
    assert float(c) != pytest.approx(float(a), rel=1e-2)
