"""What a prior kind provides, so that stages, the generator and RL never test a kind's name.

A kind is one file under models/priors/ that defines a `PriorKind` subclass and a module-level
`KIND = ThatKind()`; the package finds it by itself (models/priors/__init__.py). Its params
are the `prior` section of params.yaml (config.Prior): a kind with knobs of its own adds
them there. The prior stage trains any kind the same way (inputs -> loss -> validate),
the generator samples it through `sample_codes`, and RL fine-tunes it through `policy`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from genpipe.rl import Rollout

if TYPE_CHECKING:
    from genpipe.config import Finetune, Prior
    from genpipe.generator import Generator
    from genpipe.models.tokenizer import VQAutoencoder


Tensor = torch.Tensor
RNG = torch.Generator
Settings = dict[str, Any] | None  # a kind's recorded settings besides sampling (`settings`)
Metrics = dict[str, float]


class PriorFileError(ValueError):
    """A prior does not fit the tokenizer it is paired with."""


@dataclass(frozen=True)
class CodeSpace:
    """What a prior is built for: the tokenizer's codes and the dataset's classes."""

    codebook_size: int
    grid: tuple[int, int]
    latent_dim: int
    num_classes: int


def transformer_arch(cfg: Prior, space: CodeSpace) -> dict[str, Any]:
    """Constructor arguments a transformer-shaped prior shares: its grid, its classes and the
    size of its trunk (`prior.dim`, `depth`, `heads`)."""
    return {
        "grid": space.grid,
        "num_classes": space.num_classes,
        "dim": cfg.dim,
        "depth": cfg.depth,
        "heads": cfg.heads,
    }


class PriorKind:
    """One kind of prior. Subclasses set `name` and `module` and override what differs."""

    name: ClassVar[str]
    module: ClassVar[type[nn.Module]]
    cfg_scale: ClassVar[float] = 1.0  # the guidance when params name none for this kind

    def guidance(self, cfg: Prior) -> float:
        """The classifier-free guidance scale to sample with: `prior.cfg_scale`, else this
        kind's entry of `prior.cfg_by_kind`, else its own (guidance that suits one kind can
        ruin another's diversity, and the best scale moves with the data)."""
        if cfg.cfg_scale is not None:
            return cfg.cfg_scale
        return cfg.cfg_by_kind.get(self.name, self.cfg_scale)

    def build(self, arch: dict[str, Any]) -> nn.Module:
        return self.module(**arch)

    def from_params(self, cfg: Prior, space: CodeSpace) -> dict[str, Any]:
        """Constructor arguments of `module`, as recorded in the prior's model file."""
        raise NotImplementedError

    def sampling(self, cfg: Prior) -> dict[str, Any]:
        """Sampler settings recorded with the prior (the generator's defaults)."""
        raise NotImplementedError

    def settings(self, cfg: Prior) -> dict[str, Any] | None:
        """Anything else the model file must record to train and sample it (e.g. the
        diffusion formulation); None when nothing."""
        return None

    def calibrate(self, tokenizer: VQAutoencoder, train_codes: torch.Tensor) -> dict[str, Any]:
        """Statistics of the training codes that sampling needs (added to `sampling`)."""
        return {}

    def inputs(self, tokenizer: VQAutoencoder, codes: Tensor, sampling: dict[str, Any]) -> Tensor:
        """What the net trains on, from code grids (N, h, w): the codes themselves here."""
        return codes

    def loss(self, net: nn.Module, settings: Settings, x: Tensor, y: Tensor, rng: RNG) -> Tensor:
        """The training loss of one batch; the module's own `loss` here."""
        return net.loss(x, y, rng)  # type: ignore[operator]

    def validate(
        self, net: nn.Module, settings: Settings, x: Tensor, y: Tensor, seed: int
    ) -> Metrics:
        """Held-out metrics of the trained net (eval mode, no grad)."""
        raise NotImplementedError

    def sample_codes(self, gen: Generator, labels: Tensor, rng: RNG, **sampling: Any) -> Tensor:
        """Code grids (B, h, w) for `labels` (B,), with `sampling` settings."""
        raise NotImplementedError

    def check_compatible(self, tokenizer: VQAutoencoder, prior: nn.Module, path: Path) -> None:
        """Refuse a prior file made for another tokenizer's codes."""
        size = getattr(prior, "vocab_size", tokenizer.codebook_size)
        if size != tokenizer.codebook_size:
            raise PriorFileError(
                f"{path}: prior has {size} codes but the tokenizer has "
                f"{tokenizer.codebook_size}; re-run `dvc repro prior`"
            )

    def policy(self, gen: Generator, reference: nn.Module, cfg: Finetune, cfg_scale: float) -> Any:
        """The prior as an RL policy (genpipe.rl.Policy); a whole code grid is one action."""
        return WholeSamplePolicy(gen, reference, cfg, cfg_scale)


class WholeSamplePolicy:
    """A prior that samples a whole code grid and scores it as one sequence: its module has
    `sample(labels, generator, temperature=, cfg_scale=)` and `log_prob(codes, labels,
    cfg_scale, temperature)`. (For `ar`, per-code ratios clipped per code let a grid move L
    times further per update, and drifted further from the prior for no more reward,
    measured.)"""

    def __init__(self, gen: Generator, reference: nn.Module, cfg: Finetune, cfg_scale: float):
        self.tokenizer, self.net, self.reference = gen.tokenizer, gen.prior, reference
        self.cfg_scale, self.temperature = cfg_scale, cfg.temperature

    def _log_prob(self, net: nn.Module, codes: torch.Tensor, labels: torch.Tensor):
        return net.log_prob(codes, labels, self.cfg_scale, self.temperature)[:, None]  # type: ignore[operator]

    def _sample(self, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.net.sample(  # type: ignore[operator]
            labels, generator, temperature=self.temperature, cfg_scale=self.cfg_scale
        )

    def rollout(self, labels: torch.Tensor, generator: torch.Generator) -> Rollout:
        with torch.no_grad():
            codes = self._sample(labels, generator)
            old = self._log_prob(self.net, codes, labels)
            ref = self._log_prob(self.reference, codes, labels)
            images = self.tokenizer.decode_codes(codes)
        return Rollout(labels, images, old, ref, codes, 1)

    def log_prob(self, rollout: Rollout) -> torch.Tensor:
        return self._log_prob(self.net, rollout.replay, rollout.labels)
