"""The `pretrain` output: the SSL encoder, shaped as the tokenizer's encoder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from genpipe.artifacts import SSL_ENCODER
from genpipe.config import Params
from genpipe.modelio import load_model
from genpipe.models.autoencoder import Encoder


def encoder_arch(params: Params) -> dict[str, Any]:
    """The tokenizer's encoder, so the SSL encoder can initialise it or serve as its
    feature net: what `pretrain` builds and what `tokenizer` expects."""
    t = params.tokenizer
    return {
        "in_channels": params.prepare.channels,
        "channels": tuple(t.channels),
        "num_res_blocks": t.num_res_blocks,
        "out_dim": t.embed_dim,
    }


def load_ssl_encoder(params: Params, root: Path) -> nn.Module:
    """The `pretrain` encoder, refused unless its architecture is this tokenizer's encoder."""
    encoder, _ = load_model(root / SSL_ENCODER, "ssl_encoder", Encoder, encoder_arch(params))
    return encoder
