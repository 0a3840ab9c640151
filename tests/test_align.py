"""Representation alignment (REPA) of the priors with the SSL encoder: the loss, its head, the
grid check, its params, and the prior stage with it on and off."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml

from genpipe.artifacts.encoder import encoder_arch
from genpipe.artifacts.generator import load_generator
from genpipe.artifacts.tokenizer import build_tokenizer, tokenizer_arch
from genpipe.config import ParamsError, parse_params
from genpipe.data.raw import DataError
from genpipe.modelio import save_model
from genpipe.models.align import (
    AlignedPrior,
    AlignHead,
    GridMismatch,
    cosine_align_loss,
    ssl_targets,
)
from genpipe.models.autoencoder import Encoder
from genpipe.models.classifier import Classifier
from genpipe.models.priors import PRIOR_KINDS
from genpipe.models.priors.ar import ARPrior
from genpipe.models.priors.diffusion import Denoiser
from genpipe.models.priors.maskgit import MaskGITPrior
from genpipe.stages import prior

REPO = Path(__file__).resolve().parents[1]
CLASSES, GRID, DIM, FEAT = 3, (2, 2), 16, 4
PARAMS = {
    "tokenizer": {"channels": [4, 8], "num_res_blocks": 0, "embed_dim": FEAT, "codebook_size": 8},
    "prior": {
        "kind": "ar",
        "dim": DIM,
        "depth": 2,
        "heads": 2,
        "samples_per_class": 2,
        "optim": {"steps": 20, "batch_size": 16, "lr": 0.01, "warmup_steps": 1, "grad_clip": 0},
    },
}


def _nets() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    return {
        "ar": ARPrior(8, GRID, CLASSES, DIM, 2, 2),
        "maskgit": MaskGITPrior(8, GRID, CLASSES, DIM, 2, 2),
        "diffusion": Denoiser(FEAT, GRID, CLASSES, DIM, 2, 2),
    }


def _loss_args(name: str, n: int = 6):
    g = torch.Generator().manual_seed(1)
    y = torch.arange(n) % CLASSES
    if name == "diffusion":
        return torch.randn(n, FEAT, *GRID, generator=g), y
    return torch.randint(0, 8, (n, *GRID), generator=g), y


def test_cosine_loss_is_zero_when_aligned_and_refuses_other_shapes():
    t = torch.randn(2, 4, 3)
    assert cosine_align_loss(3 * t, t).abs() < 1e-6
    assert cosine_align_loss(-t, t).item() == pytest.approx(2.0)
    with pytest.raises(ValueError, match=r"one shape \(B, L, F\)"):
        cosine_align_loss(torch.randn(2, 5, 3), t)


@pytest.mark.parametrize("name", ["ar", "maskgit", "diffusion"])
def test_every_kind_exposes_one_hidden_state_per_grid_cell(name):
    net = _nets()[name]
    aligned = AlignedPrior(net, AlignHead(DIM, FEAT), depth=2)
    kind = PRIOR_KINDS[name]
    x, y = _loss_args(name)
    settings = kind.settings(parse_params({"prior": {"kind": name}}).prior)
    with aligned.capture() as hidden:
        kind.loss(net, settings, x, y, torch.Generator().manual_seed(0))
    assert len(hidden) == 1 and hidden[0].shape == (6, GRID[0] * GRID[1], DIM)
    assert not net.blocks[1]._forward_hooks  # the hook leaves with the context


def test_alignment_training_lowers_the_cosine_distance(one_thread):
    """A toy: the head and the first block learn to point each cell's hidden state at a fixed
    per-cell target feature."""
    net = _nets()["ar"]
    aligned = AlignedPrior(net, AlignHead(DIM, FEAT), depth=1)
    codes, y = _loss_args("ar", 32)
    target = torch.randn(1, 4, FEAT).expand(32, -1, -1) + 0.1 * torch.randn(32, 4, FEAT)
    opt = torch.optim.Adam(aligned.parameters(), lr=3e-3)

    def step() -> float:
        with aligned.capture() as hidden:
            net(codes, y)
        loss = aligned.align_loss(hidden, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()

    first = step()
    for _ in range(60):
        last = step()
    assert first > 0.5 and last < 0.2 * first


def test_the_heads_seeded_init_leaves_the_global_rng_alone():
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    a = AlignHead(DIM, FEAT, seed=7)
    assert torch.equal(torch.rand(3), expected)
    b = AlignHead(DIM, FEAT, seed=7)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_aligned_prior_refuses_a_block_it_does_not_have():
    with pytest.raises(ValueError, match=r"prior.align_depth: must be in \[1, 2\]"):
        AlignedPrior(_nets()["ar"], AlignHead(DIM, FEAT), depth=3)
    with pytest.raises(ValueError, match="prior.align_weight: Linear has no `blocks`"):
        AlignedPrior(torch.nn.Linear(2, 2), AlignHead(DIM, FEAT), depth=1)


def test_ssl_targets_are_raster_cells_and_refuse_another_grid():
    encoder = Encoder(1, (4, 8), 0, FEAT)
    images = torch.rand(5, 1, 4, 4)
    feats = ssl_targets(encoder, images, GRID, batch_size=2)
    with torch.no_grad():
        direct = encoder(images)
    assert feats.shape == (5, 4, FEAT)
    assert torch.allclose(feats[:, 1], direct[:, :, 0, 1])  # cell (0, 1) is raster cell 1
    with pytest.raises(
        GridMismatch, match=r"feature map is \(2, 2\) but the code grid is \(4, 4\)"
    ):
        ssl_targets(encoder, images, (4, 4))


@pytest.mark.parametrize("preset", ["digits", "mnist"])
def test_the_ssl_feature_map_is_the_code_grid_in_each_preset(preset):
    params = parse_params(yaml.safe_load((REPO / "presets" / f"{preset}.yaml").read_text()))
    size = params.prepare.image_size
    encoder = Encoder(**encoder_arch(params))
    grid = build_tokenizer(params).grid(size)
    assert grid == {"digits": (4, 4), "mnist": (7, 7)}[preset]
    images = torch.zeros(2, params.prepare.channels, size, size)
    assert ssl_targets(encoder, images, grid).shape[1] == grid[0] * grid[1]


def test_align_params_are_validated():
    assert parse_params({}).prior.align_weight == 0.0
    with pytest.raises(ParamsError, match="prior.align_weight"):
        parse_params({"prior": {"align_weight": -1}})
    with pytest.raises(ParamsError, match=r"align_depth: must be at most depth \(2\), got 3"):
        parse_params({"prior": {"depth": 2, "align_depth": 3}})


def _inputs(root: Path, params, n: int = 48) -> None:
    """What the aligned prior stage reads: tokenizer, codes of the prepared train images, the
    evaluator judge and the SSL encoder."""
    torch.manual_seed(0)
    tokenizer = build_tokenizer(params).eval()
    save_model(root / "models/tokenizer/model.pt", "tokenizer", tokenizer_arch(params), tokenizer)
    ssl = Encoder(**encoder_arch(params))
    save_model(root / "models/pretrain/encoder.pt", "ssl_encoder", encoder_arch(params), ssl)
    g = np.random.default_rng(0)
    for split in ("train", "val"):
        labels = np.arange(n) % CLASSES
        images = g.random((n, 1, 4, 4), dtype=np.float32)
        with torch.no_grad():
            codes = tokenizer.encode_codes(torch.from_numpy(images)).numpy()
        for folder, name, arr in (
            ("data/prepared", "images.npy", images),
            ("data/prepared", "labels.npy", labels),
            ("data/codes", "codes.npy", codes),
            ("data/codes", "labels.npy", labels),
        ):
            (root / folder / split).mkdir(parents=True, exist_ok=True)
            np.save(root / folder / split / name, arr.astype(arr.dtype))
    card = {"codebook_size": 8, "grid": list(codes.shape[1:])}
    (root / "data/codes/card.json").write_text(json.dumps(card))
    arch = {"arch": "mlp", "in_channels": 1, "image_size": 4, "num_classes": CLASSES, "width": 8}
    save_model(
        root / "models/judges/evaluator.pt",
        "classifier",
        {**arch, "dropout": 0.0},
        Classifier(**arch, dropout=0.0),
    )


def _dep_tags(root: Path) -> set[str]:
    """The inputs the latest prior run in `root` recorded (its lineage `dep.` tags)."""
    client = mlflow.MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(
        experiments, f"tags.`genpipe.root` = '{root}'", order_by=["attributes.start_time DESC"]
    )
    return {k for k in runs[0].data.tags if k.startswith("dep.")}


def _params(kind: str, weight: float):
    over = {"prepare": {"image_size": 4}, "prior": {"kind": kind, "align_weight": weight}}
    return parse_params({**PARAMS, **over, "prior": {**PARAMS["prior"], **over["prior"]}})


@pytest.mark.parametrize("kind", ["ar", "diffusion"])
def test_weight_zero_trains_the_same_bytes_as_no_alignment(kind, tmp_path, mlflow_uri, one_thread):
    """With alignment in the loop at weight 0 the prior gets no gradient from it: every weight
    equals training without the head (the head's init does not touch the global RNG).
    grad_clip is 0 here: the clip norm over the net's and the head's (zero) gradients sums a
    longer list and can round differently. (The stage itself does not build the head at
    weight 0, so its prior is made by exactly the code path without alignment.)"""
    params = _params(kind, 0.0)
    _inputs(tmp_path, params)
    pk = PRIOR_KINDS[kind]
    tokenizer = build_tokenizer(params)
    codes = torch.from_numpy(np.load(tmp_path / "data/codes/train/codes.npy"))
    y = torch.from_numpy(np.load(tmp_path / "data/codes/train/labels.npy"))
    sampling = {**pk.sampling(params.prior), **pk.calibrate(tokenizer, codes)}
    x = pk.inputs(tokenizer, codes, sampling)
    space_arch = pk.from_params(params.prior, _space(tokenizer, codes))
    targets = prior.alignment_targets(params, tmp_path, y, tuple(codes.shape[1:]))
    finals = []
    for t in (None, targets):
        ctx = prior.SPEC.start(params, tmp_path / str(t is None), deps=())
        torch.manual_seed(0)
        net = pk.build(space_arch)
        final, history = prior.train(params, pk, net, pk.settings(params.prior), x, y, ctx, None, t)
        finals.append(final.state_dict())
        assert ("align_loss" in history[0]) == (t is not None)
    plain, zero_weight = finals
    assert plain.keys() == zero_weight.keys()
    assert all(torch.equal(plain[k], zero_weight[k]) for k in plain)


def _space(tokenizer, codes):
    from genpipe.models.priors.base import CodeSpace

    return CodeSpace(tokenizer.codebook_size, tuple(codes.shape[1:]), tokenizer.latent_dim, CLASSES)


def test_the_stage_aligns_and_serves_the_prior_without_its_head(tmp_path, mlflow_uri, one_thread):
    params = _params("ar", 0.5)
    _inputs(tmp_path, params)
    prior.run(prior.SPEC.view(params), tmp_path)
    curve = (tmp_path / "plots/prior/loss.csv").read_text().splitlines()
    assert "align_loss" in curve[0]
    first, last = (
        dict(zip(curve[0].split(","), r.split(","), strict=True)) for r in (curve[1], curve[-1])
    )
    assert float(last["align_loss"]) < float(first["align_loss"])
    gen = load_generator(tmp_path / "models/tokenizer/model.pt", tmp_path / "models/prior/prior.pt")
    assert isinstance(gen.prior, ARPrior)
    assert not any("head.mlp" in k for k in gen.prior.state_dict())
    assert {"dep.models/pretrain", "dep.data/prepared"} <= _dep_tags(tmp_path)


def test_weight_zero_needs_no_ssl_encoder_and_a_wrong_order_is_refused(
    tmp_path, mlflow_uri, one_thread
):
    _inputs(tmp_path, _params("ar", 0.0))
    (tmp_path / "models/pretrain/encoder.pt").unlink()
    prior.run(prior.SPEC.view(_params("ar", 0.0)), tmp_path)  # off: pretrain is not read
    assert not {"dep.models/pretrain", "dep.data/prepared"} & _dep_tags(tmp_path)
    labels = tmp_path / "data/prepared/train/labels.npy"
    np.save(labels, np.roll(np.load(labels), 1))
    with pytest.raises(DataError, match="does not match data/prepared/train image by image"):
        prior.run(prior.SPEC.view(_params("ar", 0.5)), tmp_path)
