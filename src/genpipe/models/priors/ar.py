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

from genpipe.models.priors.base import (
    RNG,
    CodeSpace,
    Metrics,
    PriorKind,
    Settings,
    Tensor,
    WholeSamplePolicy,
    transformer_arch,
)
from genpipe.rl import Rollout, kl_exact

if TYPE_CHECKING:
    from genpipe.config import Finetune, Prior
    from genpipe.generator import Generator

POSITIONS = ("rope2d", "learned")
CODE_LOG_PROB_FLOOR = -100.0  # log-prob of a code outside the top-k/top-p set (see log_prob)


def rope2d_tables(grid: tuple[int, int], head_dim: int, base: float = 10000.0):
    """cos/sin tables (L, head_dim/2) for 2-D rotary positions of the raster cells of `grid`.

    Half the rotated pairs turn with the row index, half with the column index, so attention
    scores depend on the 2-D offset between cells rather than on the 1-D raster distance.
    """
    h, w = grid
    quarter = head_dim // 4
    freqs = base ** (-torch.arange(quarter, dtype=torch.float64) / quarter)
    cells = torch.arange(h * w)
    rows, cols = (cells // w).double(), (cells % w).double()
    angles = torch.cat([rows[:, None] * freqs, cols[:, None] * freqs], dim=1)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (j, j + d/2) of the last dim of x by the angles in cos/sin, which broadcast
    against x with last dim d/2."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class KVCache:
    """Keys/values per layer, preallocated for `max_len` positions on first use (so they take
    the dtype attention runs in, e.g. bf16 under autocast); `length` positions are filled."""

    def __init__(self, max_len: int) -> None:
        self.max_len, self.length = max_len, 0
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, H, n, d) at positions length..length+n-1; return all filled so far."""
        if layer not in self.keys:
            b, h, _, d = k.shape
            self.keys[layer] = k.new_zeros(b, h, self.max_len, d)
            self.values[layer] = v.new_zeros(b, h, self.max_len, d)
        end = self.length + k.shape[2]
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.dropout = dropout

    def forward(self, x, rope, cache: KVCache | None, layer: int) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.heads, d // self.heads)
        q, k, v = qkv.unbind(2)
        if rope is not None:  # q and k in one call: (b, n, 2, H, hd) against (n, 1, 1, hd/2)
            q, k = apply_rope(qkv[:, :, :2], *(t[:, None, None] for t in rope)).unbind(2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        causal = True
        if cache is not None:
            if n > 1 and cache.length > 0:
                raise ValueError("with a KV cache, several positions at once must start at 0")
            k, v = cache.update(layer, k, v)
            causal = n > 1  # one new query sees every cached position
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=causal)
        return self.proj(y.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, 4 * dim, bias=False), nn.GELU(), nn.Linear(4 * dim, dim, bias=False)
        )
        self.drop = nn.Dropout(dropout)

    def forward(self, x, rope, cache: KVCache | None, layer: int) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x), rope, cache, layer))
        return x + self.drop(self.mlp(self.ln2(x)))


def filter_logits(
    logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """Set logits outside the top-k and outside the top-p nucleus to -inf (the best one stays)."""
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        outside = probs.cumsum(dim=-1) - probs > top_p  # mass before this one already covers p
        logits = logits.masked_fill(outside.scatter(-1, order, outside), float("-inf"))
    return logits


def sample_categorical(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Inverse-CDF draw from each row of probs (B, K). The uniforms come from `generator` on its
    own device, so a CPU generator gives the same draws whatever device the model is on."""
    u = torch.rand(probs.shape[0], 1, generator=generator, device=generator.device)
    cdf = probs.float().cumsum(dim=-1)
    u = u.to(probs.device) * cdf[:, -1:]
    return (cdf <= u).sum(dim=-1).clamp(max=probs.shape[-1] - 1)


class ARPrior(nn.Module):
    """Class-conditional autoregressive prior p(codes | class) over an (h, w) grid of K codes."""

    def __init__(
        self,
        vocab_size: int,
        grid: tuple[int, int],
        num_classes: int,
        dim: int,
        depth: int,
        heads: int,
        dropout: float = 0.0,
        class_dropout: float = 0.1,
        pos: str = "rope2d",
    ) -> None:
        super().__init__()
        if pos not in POSITIONS:
            raise ValueError(f"pos must be one of {POSITIONS}, got {pos!r}")
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        head_dim = dim // heads
        if pos == "rope2d" and head_dim % 4:
            raise ValueError(f"rope2d needs head_dim = dim/heads divisible by 4, got {head_dim}")
        if not 0.0 <= class_dropout < 1.0:
            raise ValueError(f"class_dropout must be in [0, 1), got {class_dropout}")
        self.vocab_size, self.grid, self.num_classes = vocab_size, tuple(grid), num_classes
        self.seq_len = grid[0] * grid[1]
        self.depth = depth
        self.class_dropout, self.pos = class_dropout, pos
        self.tok_emb = nn.Embedding(vocab_size, dim)
        self.class_emb = nn.Embedding(num_classes + 1, dim)  # index num_classes = null class
        if pos == "learned":
            self.pos_emb = nn.Embedding(self.seq_len, dim)  # an Embedding: no weight decay
        else:
            cos, sin = rope2d_tables(self.grid, head_dim)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(dim, heads, dropout) for _ in range(depth))
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        self._init_weights()

    def _init_weights(self) -> None:
        """GPT-2 init: N(0, 0.02), residual output projections scaled by 1/sqrt(2 * depth)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
        for block in self.blocks:
            for proj in (block.attn.proj, block.mlp[2]):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * self.depth))

    @property
    def null_class(self) -> int:
        return self.num_classes

    def drop_labels(self, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Bool mask (B,) of labels to replace by the null class, drawn with p = class_dropout."""
        u = torch.rand(labels.shape[0], generator=generator, device=generator.device)
        return (u < self.class_dropout).to(labels.device)

    def _trunk(self, x: torch.Tensor, start: int, cache: KVCache | None) -> torch.Tensor:
        """Embedded inputs (B, n, dim) at positions start..start+n-1 -> logits (B, n, K)."""
        n = x.shape[1]
        if cache is not None and cache.length != start:
            raise ValueError(f"KV cache holds {cache.length} positions, asked to start at {start}")
        if start + n > self.seq_len:
            raise ValueError(f"sequence of {start + n} positions exceeds grid of {self.seq_len}")
        rope = None
        if self.pos == "learned":
            x = x + self.pos_emb.weight[start : start + n]
        else:
            rope = (self.rope_cos[start : start + n], self.rope_sin[start : start + n])
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            x = block(x, rope, cache, i)
        if cache is not None:
            cache.length = start + n
        return self.head(self.ln_f(x))

    def _class_tokens(self, labels: torch.Tensor, drop_mask: torch.Tensor | None):
        if drop_mask is not None:
            labels = torch.where(drop_mask, torch.full_like(labels, self.null_class), labels)
        return self.class_emb(labels)[:, None]

    def _flat(self, codes: torch.Tensor) -> torch.Tensor:
        codes = codes.reshape(codes.shape[0], -1)
        if codes.shape[1] != self.seq_len:
            raise ValueError(f"expected {self.seq_len} codes per sample, got {codes.shape[1]}")
        return codes

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
        drop = self.drop_labels(labels, generator) if self.training else None
        logits = self(codes, labels, drop)
        return F.cross_entropy(logits.flatten(0, 1).float(), self._flat(codes).flatten())

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
        _check_sampling(cfg_scale, temperature)
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
        _check_sampling(cfg_scale, temperature)
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


def _check_sampling(cfg_scale: float, temperature: float) -> None:
    if cfg_scale < 0:
        raise ValueError(f"cfg_scale must be >= 0, got {cfg_scale}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


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


class ARKind(PriorKind):
    name = "ar"
    module = ARPrior
    cfg_scale = 2.0

    def from_params(self, cfg: Prior, space: CodeSpace) -> dict[str, Any]:
        return {
            "vocab_size": space.codebook_size,
            **transformer_arch(cfg, space),
            "dropout": cfg.dropout,
            "class_dropout": cfg.class_dropout,
            "pos": cfg.pos,
        }

    def sampling(self, cfg: Prior) -> dict[str, Any]:
        return {
            "cfg_scale": self.guidance(cfg),
            "temperature": cfg.temperature,
            "top_k": cfg.top_k,
            "top_p": cfg.top_p,
        }

    def validate(
        self, net: nn.Module, settings: Settings, x: Tensor, y: Tensor, seed: int
    ) -> Metrics:
        assert isinstance(net, ARPrior)
        return {"val_nll_bits_per_code": net.nll_bits_per_code(x, y)}

    def sample_codes(self, gen: Generator, labels: Tensor, rng: RNG, **s: Any) -> Tensor:
        assert isinstance(gen.prior, ARPrior)
        return gen.prior.sample(
            labels,
            rng,
            temperature=s.get("temperature", 1.0),
            top_k=s.get("top_k"),
            top_p=s.get("top_p"),
            cfg_scale=s.get("cfg_scale", 1.0),
        )

    def policy(self, gen: Generator, reference: nn.Module, cfg: Finetune, cfg_scale: float):
        return ARPolicy(gen, reference, cfg, cfg_scale)


KIND = ARKind()
