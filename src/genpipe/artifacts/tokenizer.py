"""The `tokenizer` output: the VQ autoencoder, checked against the params that ask for it."""

from __future__ import annotations

from pathlib import Path

from genpipe.config import Params
from genpipe.modelio import load_model
from genpipe.models.tokenizer import VQAutoencoder


def build_tokenizer(params: Params) -> VQAutoencoder:
    return VQAutoencoder(**params.tokenizer.arch(params.prepare.channels))


def load_tokenizer(path: Path, params: Params | None = None) -> VQAutoencoder:
    """The trained tokenizer; with `params`, refuse a file made for another architecture."""
    expect = params.tokenizer.arch(params.prepare.channels) if params else None
    model, _ = load_model(path, "tokenizer", VQAutoencoder, expect)
    assert isinstance(model, VQAutoencoder)
    return model
