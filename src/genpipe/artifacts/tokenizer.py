"""The `tokenizer` output: the VQ autoencoder, checked against the params that ask for it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from genpipe.config import Params
from genpipe.modelio import load_model
from genpipe.models.tokenizer import VQAutoencoder


def tokenizer_arch(params: Params) -> dict[str, Any]:
    """Constructor arguments of `VQAutoencoder`, as recorded in its model file."""
    t = params.tokenizer
    common = {
        "in_channels": params.prepare.channels,
        "channels": tuple(t.channels),
        "num_res_blocks": t.num_res_blocks,
        "embed_dim": t.embed_dim,
        "quantizer": t.quantizer,
    }
    if t.quantizer == "fsq":
        return {**common, "levels": tuple(t.fsq_levels)}
    return {
        **common,
        "codebook_size": t.codebook_size,
        "code_dim": t.code_dim,
        "beta": t.beta,
        "ema": t.ema,
        "decay": t.decay,
        "kmeans_init": t.kmeans_init,
        "dead_code_threshold": t.dead_code_threshold,
        "cosine": t.cosine,
    }


def build_tokenizer(params: Params) -> VQAutoencoder:
    return VQAutoencoder(**tokenizer_arch(params))


def load_tokenizer(path: Path, params: Params | None = None) -> VQAutoencoder:
    """The trained tokenizer; with `params`, refuse a file made for another architecture."""
    expect = tokenizer_arch(params) if params else None
    model, _ = load_model(path, "tokenizer", VQAutoencoder, expect)
    assert isinstance(model, VQAutoencoder)
    return model
