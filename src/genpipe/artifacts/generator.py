"""The `prior` and `finetune` outputs: prior model files, and the generator they make with
the tokenizer (what evaluation, RL and the registered model sample)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from genpipe.artifacts.tokenizer import load_tokenizer
from genpipe.generator import Generator, check_compatible
from genpipe.modelio import ModelFileError, read_model_file
from genpipe.models.priors import build_prior, prior_kind


def load_prior(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    """A prior model file -> (module, extra) with extra = {prior_kind, sampling, formulation}."""
    blob = read_model_file(path, "prior")
    extra = blob.get("extra", {})
    kind = extra.get("prior_kind")
    try:
        prior_kind(kind)
    except ValueError as exc:
        raise ModelFileError(f"{path}: prior file without a valid prior_kind ({exc})") from None
    module = build_prior(kind, blob["arch"])
    try:
        module.load_state_dict(blob["state_dict"])
    except RuntimeError as exc:
        raise ModelFileError(f"{path}: weights do not fit the {kind} prior: {exc}") from None
    return module.eval(), extra


def load_generator(tokenizer_path: Path, prior_path: Path) -> Generator:
    """Tokenizer + prior from their two files, refused when they do not fit each other."""
    tokenizer = load_tokenizer(tokenizer_path)
    prior, extra = load_prior(prior_path)
    check_compatible(tokenizer, prior, extra["prior_kind"], prior_path)
    return Generator(
        tokenizer, prior, extra["prior_kind"], extra.get("sampling", {}), extra.get("formulation")
    )
