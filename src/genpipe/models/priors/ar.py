"""Autoregressive prior over a tokenizer's code grid: a small decoder-only transformer.

The sequence is [class token] + raster-flattened codes; the output at position i predicts
code i, so input position i carries the class token (i = 0) or code i - 1. Positions are
indexed by the cell being predicted: a query knows which grid cell it is about to fill.
A learned null class stands in for the label under class dropout, which is what
classifier-free guidance (CFG) contrasts against at sampling time.

Kind `ar` (`KIND`): trained by next-code cross-entropy on the code grids, validated by NLL in
bits per code, fine-tuned by RL with a whole grid as one action.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from genpipe.models.priors.base import RNG, Metrics, Settings, Tensor, WholeSamplePolicy
from genpipe.models.priors.transformer import (
    CodeTransformer,
    CodeTransformerKind,
    KVCache,
    check_sampling,
    filter_logits,
    sample_categorical,
    token_sampling,
)
from genpipe.rl import Rollout, kl_exact

if TYPE_CHECKING:
    from genpipe.config import Finetune
    from genpipe.generator import Generator

CODE_LOG_PROB_FLOOR = -100.0  # log-prob of a code outside the top-k/top-p set (see log_prob)


class ARPrior(CodeTransformer):
    """Class-conditional autoregressive prior p(codes | class) over an (h, w) grid of K codes."""

    causal = True
    default_pos = "rope2d"

    def _trunk(self, x: torch.Tensor, start: int, cache: KVCache | None) -> torch.Tensor:
        """Embedded inputs (B, n, dim) at positions start..start+n-1 -> logits (B, n, K)."""
        n = x.shape[1]
        if cache is not None and cache.length != start:
            raise ValueError(f"KV cache holds {cache.length} positions, asked to start at {start}")
        if start + n > self.seq_len:
            raise ValueError(f"sequence of {start + n} positions exceeds grid of {self.seq_len}")
        x = self._hidden(x, start, cache)
        if cache is not None:
            cache.length = start + n
        return self.head(self.ln_f(x))

    def _class_tokens(self, labels: torch.Tensor, drop_mask: torch.Tensor | None):
        return self.class_emb(self.with_null(labels, drop_mask))[:, None]

    def forward(
        self, codes: torch.Tensor, labels: torch.Tensor, drop_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Teacher forcing: codes (B, L) or (B, h, w), labels (B,) -> logits (B, L, K).

        `drop_mask` (B,) bool replaces those labels by the null class (see `drop_labels`).
        """
        codes = self._flat(codes)
        x = torch.cat([self._class_tokens(labels, drop_mask), self.tok_emb(codes[:, :-1])], 1)
        return self._trunk(x, 0, None)

    def loss(
        self, codes: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        """Mean next-code cross-entropy (nats), with class dropout drawn from `generator` when
        training."""
        return self.sample_losses(codes, labels, generator).mean()

    def sample_losses(
        self, codes: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        """`loss` per sample (B,): each grid's mean next-code cross-entropy, so that a
        reward-weighted fit (bench/rl_reward_weighted.py) can weight whole samples."""
        drop = self.drop_labels(labels, generator) if self.training else None
        logits = self(codes, labels, drop)
        flat = self._flat(codes)
        per_code = F.cross_entropy(logits.flatten(0, 1).float(), flat.flatten(), reduction="none")
        return per_code.view(flat.shape).mean(1)

    def _guided_logits(
        self, codes: torch.Tensor, labels: torch.Tensor, cfg_scale: float
    ) -> torch.Tensor:
        """Teacher-forced logits with CFG: uncond + s * (cond - uncond); exactly cond at s = 1."""
        if cfg_scale == 1.0:
            return self(codes, labels).float()
        both = self(codes.repeat(2, 1), labels.repeat(2), self._cfg_mask(labels.shape[0]))
        cond, uncond = both.float().chunk(2)
        return uncond + cfg_scale * (cond - uncond)

    def _cfg_mask(self, batch: int) -> torch.Tensor:
        """Drop mask for a [cond; uncond] batch of 2 * batch."""
        device = self.class_emb.weight.device
        return torch.arange(2 * batch, device=device) >= batch

    def log_probs(
        self,
        codes: torch.Tensor,
        labels: torch.Tensor,
        cfg_scale: float = 1.0,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
    ) -> torch.Tensor:
        """Per position, the log-distribution (B, L, K) `sample` draws code i from given
        codes_<i with the same settings: CFG, temperature, then top-k/top-p truncation and
        renormalisation (truncated codes are -inf); differentiable, for RL."""
        check_sampling(cfg_scale, temperature)
        logits = self._guided_logits(self._flat(codes), labels, cfg_scale) / temperature
        return filter_logits(logits, top_k, top_p).log_softmax(-1)

    def log_prob(
        self,
        codes: torch.Tensor,
        labels: torch.Tensor,
        cfg_scale: float = 1.0,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
    ) -> torch.Tensor:
        """Sum over positions of log p(code_i | codes_<i, class) under `log_probs` -> (B,).
        A code outside the truncated set scores CODE_LOG_PROB_FLOOR, not -inf: a sampled code
        on the nucleus boundary can fall outside it here, as the cached and teacher-forced
        logits round differently, and -inf - -inf would make its RL ratio NaN."""
        logp = self.log_probs(codes, labels, cfg_scale, temperature, top_k, top_p)
        picked = logp.gather(-1, self._flat(codes)[..., None]).squeeze(-1)
        return picked.clamp(min=CODE_LOG_PROB_FLOOR).sum(dim=1)

    @torch.no_grad()
    def nll_bits_per_code(
        self, codes: torch.Tensor, labels: torch.Tensor, batch_size: int = 512
    ) -> float:
        """Mean conditional negative log-likelihood in bits per code (no class dropout), in
        batches: a whole validation split at once holds (N, L, 4 * dim) activations."""
        codes = self._flat(codes)
        total = 0.0
        for i in range(0, len(codes), batch_size):
            chunk = codes[i : i + batch_size]
            logits = self(chunk, labels[i : i + batch_size]).float()
            total += F.cross_entropy(logits.flatten(0, 1), chunk.flatten(), reduction="sum").item()
        return total / codes.numel() / math.log(2)

    @torch.no_grad()
    def sample(
        self,
        labels: torch.Tensor,
        generator: torch.Generator,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        cfg_scale: float = 1.0,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """Draw codes (B, h, w) for `labels` (B,), one raster position at a time.

        With CFG the conditional and unconditional rows run as one batch of 2B; at
        cfg_scale == 1 the unconditional half is skipped, so the result equals plain
        conditional sampling. `use_cache=False` recomputes the whole prefix at each step.
        """
        check_sampling(cfg_scale, temperature)
        b = labels.shape[0]
        guided = cfg_scale != 1.0
        rows = labels.repeat(2) if guided else labels
        drop = self._cfg_mask(b) if guided else None
        cls = self._class_tokens(rows, drop)
        codes = torch.zeros(b, self.seq_len, dtype=torch.long, device=labels.device)
        cache = KVCache(self.seq_len) if use_cache else None
        for i in range(self.seq_len):
            prev = codes[:, :i].repeat(2, 1) if guided else codes[:, :i]
            if use_cache:
                x = cls if i == 0 else self.tok_emb(prev[:, -1:])
                logits = self._trunk(x, i, cache)[:, -1].float()
            else:
                x = torch.cat([cls, self.tok_emb(prev)], dim=1)
                logits = self._trunk(x, 0, None)[:, -1].float()
            if guided:
                cond, uncond = logits.chunk(2)
                logits = uncond + cfg_scale * (cond - uncond)
            logits = filter_logits(logits / temperature, top_k, top_p)
            codes[:, i] = sample_categorical(logits.softmax(dim=-1), generator)
        return codes.view(b, *self.grid)


class ARPolicy(WholeSamplePolicy):
    """The AR prior as a policy that samples and scores the distribution it is served with:
    CFG, temperature and the prior file's top-k/top-p truncation, renormalised. The reference
    prior is scored untruncated, so the KL penalty and bound measure the distance to the full
    prior (finite even where a code falls outside the reference's own nucleus), and start at
    the truncation's cost: about -log(kept mass) per code."""

    def __init__(self, gen: Generator, reference: nn.Module, cfg: Finetune, cfg_scale: float):
        super().__init__(gen, reference, cfg, cfg_scale)
        self.top_k, self.top_p = gen.sampling.get("top_k"), gen.sampling.get("top_p")
        self.exact = cfg.kl_estimator != "k3"

    def _log_prob(self, net: nn.Module, codes: torch.Tensor, labels: torch.Tensor):
        assert isinstance(net, ARPrior)
        truncate = {"top_k": self.top_k, "top_p": self.top_p} if net is self.net else {}
        return net.log_prob(codes, labels, self.cfg_scale, self.temperature, **truncate)[:, None]

    def rollout(self, labels: torch.Tensor, generator: torch.Generator) -> Rollout:
        roll = super().rollout(labels, generator)
        if self.exact:
            with torch.no_grad():
                roll.exact_kl = self.kl(roll)
        return roll

    def kl(self, rollout: Rollout) -> torch.Tensor:
        """Exact KL per sample to the untruncated reference, summed over the grid (B,)."""
        codes, labels = rollout.replay, rollout.labels
        truncate = {"top_k": self.top_k, "top_p": self.top_p}
        logp = self.net.log_probs(codes, labels, self.cfg_scale, self.temperature, **truncate)  # type: ignore[operator]
        with torch.no_grad():
            ref = self.reference.log_probs(codes, labels, self.cfg_scale, self.temperature)  # type: ignore[operator]
        return kl_exact(logp, ref)

    def _sample(self, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        assert isinstance(self.net, ARPrior)
        return self.net.sample(
            labels,
            generator,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            cfg_scale=self.cfg_scale,
        )


class ARKind(CodeTransformerKind):
    name = "ar"
    module = ARPrior
    cfg_scale = 2.0

    def validate(
        self, net: nn.Module, settings: Settings, x: Tensor, y: Tensor, seed: int
    ) -> Metrics:
        assert isinstance(net, ARPrior)
        return {"val_nll_bits_per_code": net.nll_bits_per_code(x, y)}

    def sample_codes(self, gen: Generator, labels: Tensor, rng: RNG, **s: Any) -> Tensor:
        assert isinstance(gen.prior, ARPrior)
        return gen.prior.sample(labels, rng, **token_sampling(s))

    def sample_losses(
        self, net: nn.Module, settings: Settings, x: Tensor, y: Tensor, rng: RNG
    ) -> Tensor:
        """The training loss per sample (B,); weighted, a reward-weighted fit."""
        assert isinstance(net, ARPrior)
        return net.sample_losses(x, y, rng)

    def policy(self, gen: Generator, reference: nn.Module, cfg: Finetune, cfg_scale: float):
        return ARPolicy(gen, reference, cfg, cfg_scale)


KIND = ARKind()
