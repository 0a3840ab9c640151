"""Tokenizer training: resume after an interrupt gives the same bytes, torchrun with 2
processes matches 1 process, and model files for another architecture are refused."""

import io
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from genpipe import training
from genpipe.artifacts.tokenizer import build_tokenizer, load_tokenizer, tokenizer_arch
from genpipe.config import parse_params
from genpipe.data.prepared import load_split
from genpipe.data.raw import write_raw
from genpipe.data.sources import load_source
from genpipe.modelio import ModelFileError, save_model
from genpipe.models import discriminator
from genpipe.models.autoencoder import Encoder
from genpipe.stages import prepare, tokenizer

TINY = {
    "tokenizer": {
        "channels": [8, 16],
        "embed_dim": 8,
        "codebook_size": 16,
        "num_res_blocks": 0,
        "optim": {"steps": 12, "batch_size": 32, "warmup_steps": 2, "checkpoint_every": 4},
    }
}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, mlflow_uri):
    root = tmp_path_factory.mktemp("tok")
    write_raw(load_source("digits"), root / "data/raw")
    prepare.run(parse_params({}), root)
    return root


def _weights(model) -> bytes:
    buf = io.BytesIO()
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, buf)
    return buf.getvalue()


def _train(params, root, on_step=None):
    x, _ = load_split("train", root / "data/prepared")
    ctx = tokenizer.SPEC.start(params, root, 4, deps=(Path("data/prepared"),))
    return tokenizer.train(params, x, ctx, on_step=on_step), ctx


def test_resume_after_interrupt_gives_identical_weights(prepared):
    params = parse_params(TINY)
    (model_a, hist_a), ctx = _train(params, prepared)
    ctx.checkpoint.clear()

    def interrupt(step: int, model) -> None:
        if step == 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _train(params, prepared, on_step=interrupt)
    (model_b, hist_b), ctx = _train(params, prepared)  # resumes from the step-4 checkpoint
    ctx.checkpoint.clear()
    assert _weights(model_a) == _weights(model_b)
    assert hist_a == hist_b


def test_checkpoint_for_other_params_is_not_resumed(prepared):
    params = parse_params(TINY)
    with pytest.raises(KeyboardInterrupt):
        _train(
            params,
            prepared,
            on_step=lambda s, m: (_ for _ in ()).throw(KeyboardInterrupt) if s == 5 else None,
        )
    other = parse_params({**TINY, "base": {"seed": 3}})
    ctx = tokenizer.SPEC.start(other, prepared, 4, deps=(Path("data/prepared"),))
    assert ctx.checkpoint.load() is None
    ctx_same = tokenizer.SPEC.start(params, prepared, 4, deps=(Path("data/prepared"),))
    assert ctx_same.checkpoint.load()["step"] == 4
    ctx_same.checkpoint.clear()


def test_model_file_for_another_architecture_is_refused(tmp_path):
    params = parse_params(TINY)
    model = build_tokenizer(params)
    save_model(tmp_path / "model.pt", "tokenizer", tokenizer_arch(params), model)
    other = parse_params({"tokenizer": {**TINY["tokenizer"], "codebook_size": 32}})
    with pytest.raises(ModelFileError, match="codebook_size"):
        load_tokenizer(tmp_path / "model.pt", other)
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ModelFileError, match="unreadable"):
        load_tokenizer(tmp_path / "junk.pt", params)


@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch(prepared, tmp_path, mlflow_uri):
    """DDP over gloo: each rank takes half of every global batch; gradients are averaged.
    k-means init and dead-code restart draw from rank 0's half under DDP, so they are off
    here. Stated tolerance: relative L2 distance of all weights <= 1e-3. Gradients agree only
    up to float summation order, and Adam turns a sign flip of a near-zero gradient into a
    full lr-sized step, so a few single weights can differ by ~lr while the model does not."""
    tok = {
        **TINY["tokenizer"],
        "kmeans_init": False,
        "dead_code_threshold": 0.0,
        "optim": {**TINY["tokenizer"]["optim"], "checkpoint_every": 0},
    }
    results = {}
    for n in (1, 2):
        root = tmp_path / f"n{n}"
        (root / "data").mkdir(parents=True)
        os.symlink(prepared / "data/prepared", root / "data/prepared")
        (root / "params.yaml").write_text(yaml.safe_dump({"tokenizer": tok}))
        env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri, "OMP_NUM_THREADS": "1"}
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={n}",
            "-m",
            "genpipe.cli",
            "stage",
            "tokenizer",
        ]
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[n] = torch.load(root / "models/tokenizer/model.pt", weights_only=False)[
            "state_dict"
        ]
    one = torch.cat([v.float().flatten() for v in results[1].values()])
    two = torch.cat([v.float().flatten() for v in results[2].values()])
    rel = float((one - two).norm() / one.norm())
    moved = float((one - two).abs().gt(1e-4).float().mean())
    assert rel <= 1e-3, f"relative L2 {rel:.2e}, share of weights off by >1e-4: {moved:.3%}"
    print(f"DDP vs single process: relative L2 {rel:.2e}; weights off by >1e-4: {moved:.3%}")


def _train_recorded(tmp_path, monkeypatch, **tok):
    """Train a tiny tokenizer on random 8x8 images for 6 steps with a fresh SSL encoder,
    recording what the GAN, perceptual and SSL pieces do along the way."""
    params = parse_params(
        {
            "tokenizer": {
                **TINY["tokenizer"],
                **tok,
                "optim": {**TINY["tokenizer"]["optim"], "steps": 6, "checkpoint_every": 0},
            }
        }
    )
    seen: dict = {"disc": [], "d_loss": [], "weight": [], "perceptual": [], "start": None}

    class Disc(tokenizer.PatchDiscriminator):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            seen["disc"].append((self, {k: v.clone() for k, v in self.state_dict().items()}))

    class Perceptual(tokenizer.PerceptualLoss):
        def forward(self, x, target):
            loss = super().forward(x, target)
            seen["perceptual"].append(loss.item())
            return loss

    def d_loss(real, fake):
        loss = discriminator.hinge_d_loss(real, fake)
        seen["d_loss"].append(loss.item())
        return loss

    def weight(*args):
        w = discriminator.adaptive_weight(*args)
        seen["weight"].append(w.item())
        return w

    original_make_optimizer = training.make_optimizer

    def make_optimizer(module, *args):
        if seen["start"] is None:  # the tokenizer, as training starts
            seen["start"] = {k: v.clone() for k, v in module.state_dict().items()}
        return original_make_optimizer(module, *args)

    monkeypatch.setattr(tokenizer, "PatchDiscriminator", Disc)
    monkeypatch.setattr(tokenizer, "PerceptualLoss", Perceptual)
    monkeypatch.setattr(tokenizer, "hinge_d_loss", d_loss)
    monkeypatch.setattr(tokenizer, "adaptive_weight", weight)
    monkeypatch.setattr(training, "make_optimizer", make_optimizer)  # the loop's, not the disc's
    torch.manual_seed(1)
    cfg = params.tokenizer
    ssl = Encoder(1, tuple(cfg.channels), cfg.num_res_blocks, cfg.embed_dim)
    ssl_before = {k: v.clone() for k, v in ssl.state_dict().items()}
    x = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    ctx = tokenizer.SPEC.start(params, tmp_path, 0, deps=())
    model, _ = tokenizer.train(params, x, ctx, ssl)
    return model, ssl, ssl_before, seen


GAN_SSL = {"disc_weight": 0.5, "disc_start": 2, "perceptual_weight": 1.0, "init_from_ssl": True}


@pytest.mark.usefixtures("one_thread")  # see conftest
def test_gan_perceptual_and_ssl_init_train(tmp_path, monkeypatch):
    _, ssl, ssl_before, seen = _train_recorded(tmp_path, monkeypatch, **GAN_SSL)
    # init_from_ssl: the encoder starts as the SSL encoder, which itself stays frozen
    for k, v in ssl.state_dict().items():
        assert torch.equal(seen["start"][f"encoder.{k}"], v), k
        assert torch.equal(v, ssl_before[k]), f"the SSL encoder changed: {k}"
    assert not any(p.requires_grad for p in ssl.parameters())
    # GAN: on from disc_start (steps 2..5); the discriminator trains and its loss moves
    ((disc, disc_start),) = seen["disc"]
    assert len(seen["d_loss"]) == len(seen["weight"]) == 4
    assert all(math.isfinite(v) for v in seen["d_loss"]) and len(set(seen["d_loss"])) > 1
    assert any(not torch.equal(v, disc_start[k]) for k, v in disc.state_dict().items())
    assert all(math.isfinite(w) and 0 < w <= 1.0 for w in seen["weight"]), seen["weight"]
    # perceptual: a finite positive distance, computed on every step
    assert len(seen["perceptual"]) == 6
    assert all(math.isfinite(v) and v > 0 for v in seen["perceptual"])


@pytest.mark.usefixtures("one_thread")  # see conftest
def test_without_ssl_init_or_gan_those_pieces_stay_off(tmp_path, monkeypatch):
    _, ssl, _, seen = _train_recorded(tmp_path, monkeypatch, perceptual_weight=1.0)
    assert any(
        not torch.equal(seen["start"][f"encoder.{k}"], v) for k, v in ssl.state_dict().items()
    )
    assert seen["d_loss"] == [] and seen["weight"] == []
