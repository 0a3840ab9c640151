"""A prior kind is one class: a kind defined here, and registered, goes through the prior
stage, RL fine-tuning and the registered (pyfunc) generator with no change to any of them."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from genpipe.artifacts.generator import load_generator
from genpipe.artifacts.tokenizer import build_tokenizer, tokenizer_arch
from genpipe.config import ParamsError, parse_params
from genpipe.modelio import save_model
from genpipe.models.classifier import Classifier
from genpipe.models.priors import PRIOR_KINDS, prior_kind, register
from genpipe.models.priors.base import PriorKind
from genpipe.models.priors.maskgit import MaskGITPolicy, MaskGITPrior
from genpipe.rewards import WeightedReward
from genpipe.serving import GeneratorModel
from genpipe.stages import finetune, prior

CLASSES = 3


class CellTable(nn.Module):
    """p(codes | class) with every cell independent: one table of logits per class."""

    def __init__(self, vocab_size: int, grid: tuple[int, int], num_classes: int) -> None:
        super().__init__()
        self.vocab_size, self.grid, self.num_classes = vocab_size, tuple(grid), num_classes
        self.logits = nn.Parameter(torch.zeros(num_classes, grid[0] * grid[1], vocab_size))

    def log_prob(self, codes, labels, cfg_scale: float = 1.0, temperature: float = 1.0):
        logp = (self.logits[labels] / temperature).log_softmax(-1)
        return logp.gather(-1, codes.flatten(1)[..., None]).squeeze(-1).sum(1)

    def loss(self, codes, labels, generator) -> torch.Tensor:
        return -self.log_prob(codes, labels).mean() / codes[0].numel()

    @torch.no_grad()
    def sample(self, labels, generator, temperature: float = 1.0, cfg_scale: float = 1.0):
        probs = (self.logits[labels] / temperature).softmax(-1).flatten(0, 1)
        codes = torch.multinomial(probs, 1, generator=generator)
        return codes.view(len(labels), *self.grid)


class CellTableKind(PriorKind):
    name = "cell_table"
    module = CellTable

    def from_params(self, cfg, space) -> dict[str, Any]:
        return {
            "vocab_size": space.codebook_size,
            "grid": space.grid,
            "num_classes": space.num_classes,
        }

    def sampling(self, cfg) -> dict[str, Any]:
        return {"temperature": cfg.temperature}

    def validate(self, net, settings, x, labels, seed) -> dict[str, float]:
        return {"val_nll_per_code": float(net.loss(x, labels, None))}

    def sample_codes(self, gen, labels, generator, **s: Any) -> torch.Tensor:
        return gen.prior.sample(labels, generator, temperature=s.get("temperature", 1.0))


PARAMS = {
    "tokenizer": {"channels": [4, 8], "num_res_blocks": 0, "embed_dim": 4, "codebook_size": 8},
    "prior": {
        "kind": "cell_table",
        "samples_per_class": 2,
        "steps_by_kind": {"cell_table": 30},  # optim.steps null: the kind's own steps
        "optim": {"batch_size": 16, "lr": 0.05, "warmup_steps": 1},
    },
    "finetune": {"steps": 3, "prompts_per_step": 2, "group_size": 3, "lr": 0.05},
}


@pytest.fixture
def kind():
    yield register(CellTableKind())
    PRIOR_KINDS.pop(CellTableKind.name, None)


def test_params_accept_only_registered_kinds(kind):
    assert parse_params(PARAMS).prior.kind == "cell_table"
    with pytest.raises(ParamsError, match="prior.kind: unknown prior kind 'gan'"):
        parse_params({"prior": {"kind": "gan"}})


def _inputs(root: Path, params) -> None:
    """What the prior stage reads: a tokenizer, codes made by it and the evaluator judge."""
    torch.manual_seed(0)
    tokenizer = build_tokenizer(params).eval()
    save_model(
        root / "models/tokenizer/model.pt",
        "tokenizer",
        tokenizer_arch(params),
        tokenizer,
    )
    grid = tokenizer.grid(params.prepare.image_size)
    g = np.random.default_rng(0)
    for split, n in (("train", 60), ("val", 12)):
        folder = root / "data/codes" / split
        folder.mkdir(parents=True)
        labels = np.arange(n) % CLASSES
        codes = (labels[:, None, None] * 2 + g.integers(0, 2, (n, *grid))) % 8  # class-typed
        np.save(folder / "codes.npy", codes.astype(np.int64))
        np.save(folder / "labels.npy", labels.astype(np.int64))
    card = {"codebook_size": 8, "grid": list(grid)}
    (root / "data/codes/card.json").write_text(json.dumps(card))
    arch = {"arch": "mlp", "in_channels": 1, "image_size": 8, "num_classes": CLASSES, "width": 8}
    judge = Classifier(**arch, dropout=0.0)
    save_model(root / "models/judges/evaluator.pt", "classifier", {**arch, "dropout": 0.0}, judge)


def test_a_kind_defined_here_trains_finetunes_and_serves(kind, tmp_path, mlflow_uri, one_thread):
    params = parse_params(PARAMS)
    _inputs(tmp_path, params)

    metrics = prior.run(prior.SPEC.view(params), tmp_path)  # the prior stage, as DVC runs it
    assert metrics["val_nll_per_code"] < np.log(8) - 0.3  # learned the class-typed codes
    recorded = json.loads((tmp_path / "metrics/prior.json").read_text())
    last_step = (tmp_path / "plots/prior/loss.csv").read_text().split()[-1].split(",")[0]
    assert recorded["train_steps"] == 30 and last_step == "29"  # steps_by_kind was trained
    tokenizer_file = tmp_path / "models/tokenizer/model.pt"
    prior_file = tmp_path / "models/prior/prior.pt"
    gen = load_generator(tokenizer_file, prior_file)
    assert gen.kind_of is kind and isinstance(gen.prior, CellTable)

    # finetune's RL: the kind's policy (the default whole-sample one) moves the prior
    policy, reference = finetune.make_policy(gen, params.finetune)
    gen.prior.requires_grad_(True)
    before = {k: v.clone() for k, v in policy.net.state_dict().items()}
    reward = WeightedReward({"dark": 1.0}, {"dark": lambda images, labels: -images.mean((1, 2, 3))})
    result = finetune.train(
        policy, reward, params.finetune, CLASSES, torch.Generator().manual_seed(0)
    )
    assert result.steps_run == 3
    assert not torch.equal(policy.net.logits, before["logits"])
    assert torch.equal(reference.logits, before["logits"])

    # the registered generator rebuilds the kind from its two files
    model = GeneratorModel()
    model.load_context(
        SimpleNamespace(artifacts={"tokenizer": tokenizer_file, "prior": prior_file})
    )
    frame = pd.DataFrame({"label": [0, 2, 0], "seed": [5, 5, 5]})
    images = model.predict(None, frame)
    assert images.shape == (3, 1, 8, 8) and images.dtype == np.float32
    assert np.array_equal(images[0], images[2]) and 0 <= images.min() <= images.max() <= 1


def test_a_prior_file_of_an_unregistered_kind_is_refused(kind, tmp_path, mlflow_uri):
    params = parse_params(PARAMS)
    _inputs(tmp_path, params)
    prior.run(prior.SPEC.view(params), tmp_path)
    del PRIOR_KINDS[CellTableKind.name]
    with pytest.raises(ValueError, match="prior file without a valid prior_kind"):
        load_generator(tmp_path / "models/tokenizer/model.pt", tmp_path / "models/prior/prior.pt")
    assert prior_kind("ar").name == "ar"


def test_each_kind_has_its_own_guidance_unless_params_set_one():
    default = parse_params({}).prior
    assert default.cfg_scale is None
    assert {name: PRIOR_KINDS[name].sampling(default)["cfg_scale"] for name in PRIOR_KINDS} == {
        name: PRIOR_KINDS[name].cfg_scale for name in PRIOR_KINDS
    }
    assert PRIOR_KINDS["diffusion"].cfg_scale != PRIOR_KINDS["ar"].cfg_scale
    chosen = parse_params({"prior": {"cfg_scale": 1.5}}).prior
    assert all(PRIOR_KINDS[n].sampling(chosen)["cfg_scale"] == 1.5 for n in ("ar", "maskgit"))
    # a preset tunes some kinds (mnist: ar 1.5, diffusion its own best), the rest keep theirs,
    # and a number in cfg_scale still applies to whichever kind runs
    by_kind = {"prior": {"cfg_by_kind": {"ar": 1.5, "diffusion": 1.1}}}
    tuned = parse_params(by_kind).prior
    assert {n: PRIOR_KINDS[n].sampling(tuned)["cfg_scale"] for n in PRIOR_KINDS} == {
        **{n: PRIOR_KINDS[n].cfg_scale for n in PRIOR_KINDS},
        "ar": 1.5,
        "diffusion": 1.1,
    }
    both = parse_params({"prior": {**by_kind["prior"], "cfg_scale": 3.0}}).prior
    assert all(PRIOR_KINDS[n].sampling(both)["cfg_scale"] == 3.0 for n in PRIOR_KINDS)
    sampling = PRIOR_KINDS["diffusion"].sampling(
        parse_params({"prior": {"guidance_interval": [0.2, 0.9]}}).prior
    )
    assert sampling["guidance_interval"] == [0.2, 0.9]
    with pytest.raises(ParamsError, match="prior.guidance_interval"):
        parse_params({"prior": {"guidance_interval": [0.6, 0.2]}})


MASKGIT = {
    **PARAMS,
    "prior": {
        "kind": "maskgit",
        "dim": 16,
        "depth": 1,
        "heads": 2,
        "pos": "learned",
        "decoding_steps": 3,
        "samples_per_class": 2,
        "optim": {"steps": 40, "batch_size": 16, "lr": 0.02, "warmup_steps": 1},
    },
    "finetune": {**PARAMS["finetune"], "lr": 0.002},
}


def test_maskgit_trains_finetunes_and_serves(tmp_path, mlflow_uri, one_thread):
    params = parse_params(MASKGIT)
    _inputs(tmp_path, params)

    metrics = prior.run(prior.SPEC.view(params), tmp_path)
    assert metrics["val_nll_bits_per_code_bound"] < 3.0 - 0.3  # log2(8) = 3 bits is chance
    tokenizer_file = tmp_path / "models/tokenizer/model.pt"
    prior_file = tmp_path / "models/prior/prior.pt"
    gen = load_generator(tokenizer_file, prior_file)
    assert isinstance(gen.prior, MaskGITPrior)
    assert (
        gen.sampling["steps"] == 3 and gen.sampling["cfg_scale"] == PRIOR_KINDS["maskgit"].cfg_scale
    )

    # the policy: one action per sample, scored by the sum of the per-step log-probabilities
    policy, reference = finetune.make_policy(gen, params.finetune)
    assert isinstance(policy, MaskGITPolicy)
    labels = torch.tensor([0, 1, 2, 0])
    roll = policy.rollout(labels, torch.Generator().manual_seed(0))
    traj = roll.replay
    assert roll.old_logp.shape == (4, 1) and roll.total_steps == 1 and traj.fixed.shape[0] == 3
    per_step = gen.prior.step_log_probs(traj, labels, policy.cfg_scale, policy.temperature)
    torch.testing.assert_close(roll.old_logp[:, 0], per_step.sum(1))
    torch.testing.assert_close(roll.old_logp[:, 0], traj.logp.sum(1), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(roll.ref_logp, roll.old_logp)  # nothing trained yet
    decoded = gen.tokenizer.decode_codes(traj.codes.view(4, *gen.prior.grid))
    assert torch.equal(roll.images, decoded)

    gen.prior.requires_grad_(True)
    before = {k: v.clone() for k, v in policy.net.state_dict().items()}
    reward = WeightedReward({"dark": 1.0}, {"dark": lambda images, labels: -images.mean((1, 2, 3))})
    result = finetune.train(
        policy, reward, params.finetune, CLASSES, torch.Generator().manual_seed(0)
    )
    assert result.steps_run == 3
    assert not torch.equal(policy.net.head.weight, before["head.weight"])
    assert torch.equal(reference.head.weight, before["head.weight"])

    model = GeneratorModel()
    model.load_context(
        SimpleNamespace(artifacts={"tokenizer": tokenizer_file, "prior": prior_file})
    )
    frame = pd.DataFrame({"label": [0, 2, 0], "seed": [5, 5, 5]})
    images = model.predict(None, frame)
    assert images.shape == (3, 1, 8, 8) and images.dtype == np.float32
    assert np.array_equal(images[0], images[2]) and 0 <= images.min() <= images.max() <= 1
