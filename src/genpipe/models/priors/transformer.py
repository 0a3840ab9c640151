"""What the prior nets share, so each kind's file keeps only its own logic.

The transformer trunk of the code-grid kinds (`ar`, causal; `maskgit`, bidirectional): 2-D
rotary or learned positions, pre-norm blocks, GPT-2 init, logit truncation and categorical
draws; the class conditioning with a learned null class that every kind (`diffusion` too)
drops for classifier-free guidance; and the kind plumbing `ar` and `maskgit` share.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from genpipe.models.priors.base import CodeSpace, PriorKind, transformer_arch

if TYPE_CHECKING:
    from genpipe.config import Prior

POSITIONS = ("rope2d", "learned")


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
    """Multi-head self-attention; `causal` (AR) lets a position see only those before it,
    otherwise (MaskGIT) every cell sees every cell."""

    def __init__(self, dim: int, heads: int, dropout: float, causal: bool) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.dropout, self.causal = dropout, causal

    def forward(self, x, rope, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.heads, d // self.heads)
        q, k, v = qkv.unbind(2)
        if rope is not None:  # q and k in one call: (b, n, 2, H, hd) against (n, 1, 1, hd/2)
            q, k = apply_rope(qkv[:, :, :2], *(t[:, None, None] for t in rope)).unbind(2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        causal = self.causal
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

    def __init__(self, dim: int, heads: int, dropout: float, causal: bool) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout, causal)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, 4 * dim, bias=False), nn.GELU(), nn.Linear(4 * dim, dim, bias=False)
        )
        self.drop = nn.Dropout(dropout)

    def forward(self, x, rope, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
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


def check_arch(dim: int, heads: int, class_dropout: float, pos: str | None = None) -> int:
    """Refuse a trunk that cannot be built; return its head dim. `pos` None: no positions
    to check (the denoiser's are learned)."""
    if pos is not None and pos not in POSITIONS:
        raise ValueError(f"pos must be one of {POSITIONS}, got {pos!r}")
    if dim % heads:
        raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
    head_dim = dim // heads
    if pos == "rope2d" and head_dim % 4:
        raise ValueError(f"rope2d needs head_dim = dim/heads divisible by 4, got {head_dim}")
    if not 0.0 <= class_dropout < 1.0:
        raise ValueError(f"class_dropout must be in [0, 1), got {class_dropout}")
    return head_dim


def check_sampling(cfg_scale: float, temperature: float) -> None:
    if cfg_scale < 0:
        raise ValueError(f"cfg_scale must be >= 0, got {cfg_scale}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


class ClassConditional(nn.Module):
    """A net conditioned on `num_classes` labels, with index `num_classes` a learned null class
    that class dropout (training) and the unconditional half of CFG (sampling) put in."""

    num_classes: int
    class_dropout: float

    @property
    def null_class(self) -> int:
        return self.num_classes

    def drop_labels(self, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Bool mask (B,) of labels to replace by the null class, drawn with p = class_dropout."""
        u = torch.rand(labels.shape[0], generator=generator, device=generator.device)
        return (u < self.class_dropout).to(labels.device)

    def with_null(self, labels: torch.Tensor, drop_mask: torch.Tensor | None) -> torch.Tensor:
        """`labels` with those under `drop_mask` (B,) bool replaced by the null class."""
        if drop_mask is None:
            return labels
        return torch.where(drop_mask, torch.full_like(labels, self.null_class), labels)


class CodeTransformer(ClassConditional):
    """Trunk of a class-conditional transformer over an (h, w) grid of K codes: token and class
    embeddings, positions, `depth` blocks, a final norm and a K-way head. A subclass says
    whether attention is `causal`, how many `extra_tokens` input codes beyond K it reads
    (never predicted) and its `default_pos`, the positions when `pos` is not given."""

    causal: ClassVar[bool]
    extra_tokens: ClassVar[int] = 0
    default_pos: ClassVar[str]

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
        pos: str | None = None,
    ) -> None:
        super().__init__()
        pos = self.default_pos if pos is None else pos
        head_dim = check_arch(dim, heads, class_dropout, pos)
        self.vocab_size, self.num_classes = vocab_size, num_classes
        self.grid: tuple[int, int] = (grid[0], grid[1])
        self.seq_len = grid[0] * grid[1]
        self.depth, self.class_dropout, self.pos = depth, class_dropout, pos
        self.tok_emb = nn.Embedding(vocab_size + self.extra_tokens, dim)
        self.class_emb = nn.Embedding(num_classes + 1, dim)  # index num_classes = null class
        if pos == "learned":
            self.pos_emb = nn.Embedding(self.seq_len, dim)  # an Embedding: no weight decay
        else:
            cos, sin = rope2d_tables(self.grid, head_dim)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(dim, heads, dropout, self.causal) for _ in range(depth))
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

    def _flat(self, codes: torch.Tensor) -> torch.Tensor:
        codes = codes.reshape(codes.shape[0], -1)
        if codes.shape[1] != self.seq_len:
            raise ValueError(f"expected {self.seq_len} codes per sample, got {codes.shape[1]}")
        return codes

    def _hidden(
        self, x: torch.Tensor, start: int = 0, cache: KVCache | None = None
    ) -> torch.Tensor:
        """Embedded inputs (B, n, dim) at positions start..start+n-1 through positions, dropout
        and the blocks -> (B, n, dim), before the final norm."""
        n = x.shape[1]
        rope = None
        if self.pos == "learned":
            x = x + self.pos_emb.weight[start : start + n]
        else:
            rope = (self.rope_cos[start : start + n], self.rope_sin[start : start + n])
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            x = block(x, rope, cache, i)
        return x


class CodeTransformerKind(PriorKind):
    """What the `ar` and `maskgit` kinds share: their constructor arguments and the token
    sampling settings (guidance, temperature, top-k/top-p)."""

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


def token_sampling(s: dict[str, Any]) -> dict[str, Any]:
    """The `sample` arguments of a code-grid transformer from recorded sampling settings."""
    return {
        "temperature": s.get("temperature", 1.0),
        "top_k": s.get("top_k"),
        "top_p": s.get("top_p"),
        "cfg_scale": s.get("cfg_scale", 1.0),
    }
