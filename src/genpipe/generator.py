"""Tokenizer + prior as one image generator: class labels in, images in [0, 1] out.

Used by evaluation, RL fine-tuning and the registered MLflow model alike. The prior's model
file says which kind it is and how to sample it, so a generator rebuilds itself from two files
(artifacts.load_generator); how each kind samples lives with the kind (models/priors).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from genpipe.modelio import ModelFileError
from genpipe.models.priors import prior_kind
from genpipe.models.priors.base import PriorFileError
from genpipe.models.tokenizer import VQAutoencoder


class Generator(nn.Module):
    """`sampling` holds the sampler settings recorded with the prior (e.g. cfg_scale,
    temperature for ar; sampler, steps, eta and the latent normalisation for diffusion);
    `formulation` the kind's other recorded settings (the diffusion formulation); `kind_of`
    the prior's kind (models/priors), which knows how to sample it."""

    def __init__(
        self,
        tokenizer: VQAutoencoder,
        prior: nn.Module,
        kind: str,
        sampling: dict[str, Any],
        formulation: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.kind_of = prior_kind(kind)
        self.tokenizer, self.prior, self.kind = tokenizer.eval(), prior.eval(), kind
        self.sampling = dict(sampling)
        self.formulation = dict(formulation) if formulation else None

    @torch.no_grad()
    def sample_codes(
        self, labels: torch.Tensor, generator: torch.Generator, **overrides: Any
    ) -> torch.Tensor:
        return self.kind_of.sample_codes(self, labels, generator, **{**self.sampling, **overrides})

    @torch.no_grad()
    def forward(
        self, labels: torch.Tensor, generator: torch.Generator, **overrides: Any
    ) -> torch.Tensor:
        return self.tokenizer.decode_codes(self.sample_codes(labels, generator, **overrides))


def check_compatible(tokenizer: VQAutoencoder, prior: nn.Module, kind: str, path: Path) -> None:
    """Refuse a prior file made for another tokenizer's codes."""
    try:
        prior_kind(kind).check_compatible(tokenizer, prior, path)
    except PriorFileError as exc:
        raise ModelFileError(str(exc)) from None
