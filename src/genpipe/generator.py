"""Tokenizer + prior as one image generator: class labels in, images in [0, 1] out.

Used by evaluation, RL fine-tuning and the registered MLflow model alike. The prior's model
file says which kind it is and how to sample it, so a generator rebuilds itself from two files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from genpipe.modelio import ModelFileError, read_model_file
from genpipe.models import diffusion
from genpipe.models.tokenizer import VQAutoencoder
from genpipe.models.transformer import ARPrior

PRIOR_KINDS = ("ar", "diffusion")


class Generator(nn.Module):
    """`sampling` holds the sampler settings recorded with the prior (cfg_scale, temperature,
    top_k/top_p for ar; sampler, steps, eta for diffusion) plus, for diffusion, the latent
    normalisation (`latent_shift`, `latent_scale`) the prior was trained with."""

    def __init__(
        self,
        tokenizer: VQAutoencoder,
        prior: nn.Module,
        kind: str,
        sampling: dict[str, Any],
        formulation: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if kind not in PRIOR_KINDS:
            raise ValueError(f"unknown prior kind {kind!r}; allowed: {', '.join(PRIOR_KINDS)}")
        self.tokenizer, self.prior, self.kind = tokenizer.eval(), prior.eval(), kind
        self.sampling = dict(sampling)
        self.formulation = (
            diffusion.make_formulation(**formulation)
            if kind == "diffusion" and formulation
            else None
        )

    @torch.no_grad()
    def sample_codes(
        self, labels: torch.Tensor, generator: torch.Generator, **overrides: Any
    ) -> torch.Tensor:
        s = {**self.sampling, **overrides}
        if self.kind == "ar":
            assert isinstance(self.prior, ARPrior)
            return self.prior.sample(
                labels,
                generator,
                temperature=s.get("temperature", 1.0),
                top_k=s.get("top_k"),
                top_p=s.get("top_p"),
                cfg_scale=s.get("cfg_scale", 1.0),
            )
        assert self.formulation is not None and isinstance(self.prior, diffusion.Denoiser)
        latents = diffusion.sample(
            self.prior,
            self.formulation,
            labels,
            generator,
            steps=s.get("steps", 20),
            sampler=s.get("sampler", "euler"),
            cfg_scale=s.get("cfg_scale", 1.0),
            eta=s.get("eta", 0.0),
        )
        return self.tokenizer.latent_to_codes(self.from_prior_space(latents))

    def from_prior_space(self, latents: torch.Tensor) -> torch.Tensor:
        """Undo the normalisation the diffusion prior was trained in."""
        return latents * self.sampling.get("latent_scale", 1.0) + self.sampling.get(
            "latent_shift", 0.0
        )

    @torch.no_grad()
    def forward(
        self, labels: torch.Tensor, generator: torch.Generator, **overrides: Any
    ) -> torch.Tensor:
        return self.tokenizer.decode_codes(self.sample_codes(labels, generator, **overrides))


def build_prior(kind: str, arch: dict[str, Any]) -> nn.Module:
    return ARPrior(**arch) if kind == "ar" else diffusion.Denoiser(**arch)


def load_prior(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    """A prior model file -> (module, extra) with extra = {prior_kind, sampling, formulation}."""
    blob = read_model_file(path, "prior")
    extra = blob.get("extra", {})
    kind = extra.get("prior_kind")
    if kind not in PRIOR_KINDS:
        raise ModelFileError(f"{path}: prior file without a valid prior_kind ({kind!r})")
    module = build_prior(kind, blob["arch"])
    try:
        module.load_state_dict(blob["state_dict"])
    except RuntimeError as exc:
        raise ModelFileError(f"{path}: weights do not fit the {kind} prior: {exc}") from None
    return module.eval(), extra


def load_generator(tokenizer_path: Path, prior_path: Path) -> Generator:
    from genpipe.stages.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_path)
    prior, extra = load_prior(prior_path)
    _check_compatible(tokenizer, prior, extra["prior_kind"], prior_path)
    return Generator(
        tokenizer, prior, extra["prior_kind"], extra.get("sampling", {}), extra.get("formulation")
    )


def _check_compatible(tokenizer: VQAutoencoder, prior: nn.Module, kind: str, path: Path) -> None:
    if kind == "ar" and prior.vocab_size != tokenizer.codebook_size:  # type: ignore[union-attr]
        raise ModelFileError(
            f"{path}: prior has {prior.vocab_size} codes but the tokenizer has "  # type: ignore[union-attr]
            f"{tokenizer.codebook_size}; re-run `dvc repro prior`"
        )
    if kind == "diffusion" and prior.latent_shape[0] != tokenizer.latent_dim:  # type: ignore[union-attr]
        raise ModelFileError(
            f"{path}: prior latents have {prior.latent_shape[0]} channels but the tokenizer's "  # type: ignore[union-attr]
            f"have {tokenizer.latent_dim}; re-run `dvc repro prior`"
        )
