"""Quantizers that turn a continuous latent grid into discrete codes.

Two spaces are involved. The encoder output and the decoder input live in `dim` channels.
Codes live in a `code_dim`-channel "latent" space (after an optional linear projection,
l2-normalisation or FSQ bounding); `project` maps encoder output into it, `unproject` maps it
back to `dim`. `codes_to_latent` and `latent_to_codes` work in the latent space, so a
continuous prior (diffusion) can work there and snap back to codes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

Stats = dict[str, torch.Tensor]


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def _channels_last(z: torch.Tensor) -> torch.Tensor:
    return z.permute(0, 2, 3, 1)


def _channels_first(z: torch.Tensor) -> torch.Tensor:
    return z.permute(0, 3, 1, 2)


def code_stats(codes: torch.Tensor, codebook_size: int) -> Stats:
    """Perplexity (effective number of codes) and fraction of codes used, for one batch."""
    counts = torch.bincount(codes.flatten(), minlength=codebook_size).float()
    p = counts / counts.sum()
    perplexity = torch.exp(-(p * torch.log(p.clamp_min(1e-10))).sum())
    return {"perplexity": perplexity, "usage": (counts > 0).float().mean()}


def _projections(dim: int, code_dim: int) -> tuple[nn.Module, nn.Module]:
    if dim == code_dim:
        return nn.Identity(), nn.Identity()
    return nn.Linear(dim, code_dim), nn.Linear(code_dim, dim)


class VectorQuantizer(nn.Module):
    """Nearest-neighbour codebook quantizer with straight-through gradients.

    - `ema=True`: the codebook is a buffer updated by exponential moving averages of the
      vectors assigned to each code (Laplace-smoothed counts); no gradient reaches it.
      `ema=False`: the codebook is a parameter trained by the codebook loss.
    - `kmeans_init`: the first training batch initialises the codebook by a few Lloyd
      iterations started from a seeded choice of batch vectors (no global RNG use).
    - `dead_code_threshold > 0`: after each training step, codes whose EMA usage (expected
      assignments per batch) is below it are moved onto random vectors of the batch, drawn
      from the global torch RNG (so training stays reproducible from its RNG state).
    - `cosine`: vectors and codes are l2-normalised; nearest means largest dot product.
    - `code_dim < dim`: low-dimensional codes behind linear in/out projections (ViT-VQGAN).

    For DistributedDataParallel, set `reduce` to an all_reduce(sum) and `broadcast` to a
    broadcast from rank 0: batch statistics are summed across ranks and the vectors that
    (re)initialise codes are taken from rank 0, so every rank keeps the same codebook.
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        code_dim: int | None = None,
        beta: float = 0.25,
        ema: bool = True,
        decay: float = 0.99,
        eps: float = 1e-5,
        kmeans_init: bool = True,
        kmeans_iters: int = 10,
        dead_code_threshold: float = 1.0,
        cosine: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.dim, self.codebook_size = dim, codebook_size
        self.code_dim = code_dim or dim
        self.beta, self.ema, self.decay, self.eps = beta, ema, decay, eps
        self.kmeans_iters, self.dead_code_threshold = kmeans_iters, dead_code_threshold
        self.cosine, self.seed = cosine, seed
        self.proj_in, self.proj_out = _projections(dim, self.code_dim)
        self.reduce: Callable[[torch.Tensor], torch.Tensor] = _identity
        self.broadcast: Callable[[torch.Tensor], torch.Tensor] = _identity

        init = torch.randn(
            codebook_size, self.code_dim, generator=torch.Generator().manual_seed(seed)
        )
        init = F.normalize(init, dim=-1) if cosine else init
        if ema:
            self.register_buffer("codebook", init)
        else:
            self.codebook = nn.Parameter(init)
        self.register_buffer("cluster_size", torch.ones(codebook_size))
        self.register_buffer("embed_sum", init.clone())
        self.register_buffer("initted", torch.tensor(not kmeans_init))

    # -- spaces -----------------------------------------------------------------------------

    def _project_flat(self, z: torch.Tensor) -> torch.Tensor:
        """(B, dim, h, w) -> (B*h*w, code_dim) in float32: distances and EMA need full precision."""
        x = self.proj_in(_channels_last(z).float()).reshape(-1, self.code_dim)
        return F.normalize(x, dim=-1) if self.cosine else x

    def project(self, z: torch.Tensor) -> torch.Tensor:
        """Encoder output (B, dim, h, w) -> pre-quantisation latent (B, code_dim, h, w)."""
        b, _, h, w = z.shape
        return _channels_first(self._project_flat(z).view(b, h, w, self.code_dim))

    def unproject(self, latent: torch.Tensor) -> torch.Tensor:
        """Latent (B, code_dim, h, w) -> decoder input (B, dim, h, w)."""
        return _channels_first(self.proj_out(_channels_last(latent)))

    def _codes(self) -> torch.Tensor:
        """The codebook as used: a gradient-trained cosine codebook drifts off the unit sphere.
        Normalised from a copy: normalize keeps its input for backward, and the dead-code
        restart edits the parameter in place before backward runs."""
        if self.cosine and not self.ema:
            return F.normalize(self.codebook.clone(), dim=-1)
        return self.codebook

    def codes_to_latent(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, h, w) -> code vectors (B, code_dim, h, w)."""
        return _channels_first(self._codes()[codes])

    def latent_to_codes(self, latent: torch.Tensor) -> torch.Tensor:
        """Latent (B, code_dim, h, w) -> index of the nearest code (B, h, w)."""
        b, _, h, w = latent.shape
        flat = _channels_last(latent).reshape(-1, self.code_dim).float()
        flat = F.normalize(flat, dim=-1) if self.cosine else flat
        return self._nearest(flat, self._codes().detach()).view(b, h, w)

    def _nearest(self, flat: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code for each row. On CPU the rows go in chunks whose score
        matrix stays in cache; `max(dim).indices` is several times faster there than argmax."""
        if self.cosine:
            bias, weight = codebook.new_zeros(len(codebook)), codebook.t()
        else:  # argmin ||x - e||^2 = argmax (x.e - ||e||^2 / 2); ||x||^2 is the same for all e
            bias, weight = -0.5 * codebook.pow(2).sum(1), codebook.t()
        rows = max(1, 2**20 // len(codebook)) if flat.device.type == "cpu" else len(flat)
        return torch.cat([torch.addmm(bias, x, weight).max(1).indices for x in flat.split(rows)])

    # -- training-time codebook maintenance ---------------------------------------------------

    def _sums(self, flat: torch.Tensor, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        counts = torch.bincount(codes, minlength=self.codebook_size).to(flat.dtype)
        sums = flat.new_zeros(self.codebook_size, self.code_dim).index_add_(0, codes, flat)
        return counts, sums

    @torch.no_grad()
    def _kmeans_init(self, flat: torch.Tensor) -> None:
        """Lloyd's algorithm on one batch, started from a seeded sample of its vectors."""
        n, k = flat.shape[0], self.codebook_size
        g = torch.Generator().manual_seed(self.seed)
        start = (
            torch.randperm(n, generator=g)[:k] if n >= k else torch.randint(n, (k,), generator=g)
        )
        centroids = flat[start.to(flat.device)]
        for _ in range(self.kmeans_iters):
            counts, sums = self._sums(flat, self._nearest(flat, centroids))
            means = sums / counts.clamp_min(1).unsqueeze(1)
            means = F.normalize(means, dim=-1) if self.cosine else means
            centroids = torch.where(counts.unsqueeze(1) > 0, means, centroids)
        counts, _ = self._sums(flat, self._nearest(flat, centroids))
        centroids = self.broadcast(centroids)
        self.codebook.copy_(centroids)
        self.cluster_size.copy_(self.broadcast(counts).clamp_min(1))
        self.embed_sum.copy_(centroids * self.cluster_size.unsqueeze(1))
        self.initted.fill_(True)

    @torch.no_grad()
    def _update(self, flat: torch.Tensor, codes: torch.Tensor) -> None:
        """EMA of usage (always) and of the codebook (when `ema`), then dead-code restart."""
        counts, sums = self._sums(flat, codes)
        self.cluster_size.lerp_(self.reduce(counts), 1 - self.decay)
        if self.ema:
            self.embed_sum.lerp_(self.reduce(sums), 1 - self.decay)
            n = self.cluster_size.sum()
            smoothed = (self.cluster_size + self.eps) / (n + self.codebook_size * self.eps) * n
            codebook = self.embed_sum / smoothed.unsqueeze(1)
            self.codebook.copy_(F.normalize(codebook, dim=-1) if self.cosine else codebook)
        if self.dead_code_threshold > 0:
            self._restart_dead(flat)

    def _restart_dead(self, flat: torch.Tensor) -> None:
        """Move under-used codes onto batch vectors. Branch-free (no host sync): every step
        draws one candidate per code and keeps it only where the code is dead."""
        n, k = flat.shape[0], self.codebook_size
        pick = torch.randperm(n)[:k] if n >= k else torch.randint(n, (k,))
        candidates = self.broadcast(flat[pick.to(flat.device)])
        dead = (self.cluster_size < self.dead_code_threshold).unsqueeze(1)
        self.codebook.copy_(torch.where(dead, candidates, self.codebook))
        self.cluster_size.masked_fill_(dead.squeeze(1), self.dead_code_threshold)
        self.embed_sum.copy_(
            torch.where(dead, candidates * self.dead_code_threshold, self.embed_sum)
        )

    # -- forward ------------------------------------------------------------------------------

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Stats]:
        """z (B, dim, h, w) -> (z_q (B, dim, h, w), codes (B, h, w), loss, stats)."""
        b, _, h, w = z.shape
        with torch.autocast(z.device.type, enabled=False):
            flat = self._project_flat(z)
            if self.training and not self.initted:
                self._kmeans_init(flat.detach())
            codebook = self._codes()
            codes = self._nearest(flat.detach(), codebook.detach())
            quant = codebook[codes]
            loss = self.beta * F.mse_loss(flat, quant.detach())
            if not self.ema:
                loss = loss + F.mse_loss(flat.detach(), quant)
            if self.training:
                self._update(flat.detach(), codes)
            quant = flat + (quant - flat).detach()  # straight-through
        z_q = self.unproject(_channels_first(quant.view(b, h, w, self.code_dim)))
        codes = codes.view(b, h, w)
        return z_q, codes, loss, code_stats(codes, self.codebook_size)


class FSQ(nn.Module):
    """Finite scalar quantisation (Mentzer et al. 2023): each latent channel is bounded by tanh
    and rounded to one of `levels[i]` values; a code is the mixed-radix number of the digits.
    No codebook to learn or collapse, so no auxiliary loss (loss is 0)."""

    def __init__(self, dim: int, levels: Sequence[int], eps: float = 1e-3) -> None:
        super().__init__()
        if any(level < 2 for level in levels):
            raise ValueError(f"FSQ levels must all be >= 2, got {list(levels)}")
        self.dim, self.code_dim = dim, len(levels)
        self.codebook_size = math.prod(levels)
        self.proj_in, self.proj_out = _projections(dim, self.code_dim)
        lv = torch.tensor(list(levels))
        basis = torch.cumprod(torch.cat([torch.ones(1, dtype=torch.long), lv[:-1]]), 0)
        self.register_buffer("levels", lv, persistent=False)
        self.register_buffer("basis", basis, persistent=False)
        self.register_buffer("half_width", (lv // 2).float(), persistent=False)
        # tanh bound to (-(L-1)/2 - offset, (L-1)/2 - offset): L integer values after rounding
        half_l = (lv - 1).float() * (1 + eps) / 2
        offset = (lv % 2 == 0).float() * 0.5
        self.register_buffer("half_l", half_l, persistent=False)
        self.register_buffer("offset", offset, persistent=False)
        self.register_buffer("shift", torch.atanh(offset / half_l), persistent=False)

    def _bounded(self, z: torch.Tensor) -> torch.Tensor:
        """(B, dim, h, w) -> channels-last values in the per-channel integer range, unrounded."""
        x = self.proj_in(_channels_last(z).float())
        return torch.tanh(x + self.shift) * self.half_l - self.offset

    def project(self, z: torch.Tensor) -> torch.Tensor:
        """Encoder output -> continuous latent (B, len(levels), h, w), scaled to about [-1, 1]."""
        return _channels_first(self._bounded(z) / self.half_width)

    def unproject(self, latent: torch.Tensor) -> torch.Tensor:
        return _channels_first(self.proj_out(_channels_last(latent)))

    def _digits_to_codes(self, digits: torch.Tensor) -> torch.Tensor:
        return (digits.long() * self.basis).sum(-1)

    def codes_to_latent(self, codes: torch.Tensor) -> torch.Tensor:
        digits = (codes.unsqueeze(-1) // self.basis) % self.levels
        return _channels_first((digits.float() - self.half_width) / self.half_width)

    def latent_to_codes(self, latent: torch.Tensor) -> torch.Tensor:
        digits = torch.round(_channels_last(latent) * self.half_width + self.half_width)
        return self._digits_to_codes(torch.minimum(digits.clamp_min(0), self.levels - 1))

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Stats]:
        with torch.autocast(z.device.type, enabled=False):
            bounded = self._bounded(z)
            rounded = bounded + (bounded.round() - bounded).detach()  # straight-through
            codes = self._digits_to_codes(rounded.detach() + self.half_width)
            z_q = self.unproject(_channels_first(rounded / self.half_width))
        loss = torch.zeros((), device=z.device)
        return z_q, codes, loss, code_stats(codes, self.codebook_size)


def build_quantizer(kind: str, **kwargs) -> VectorQuantizer | FSQ:
    """`vq` -> VectorQuantizer(**kwargs), `fsq` -> FSQ(**kwargs)."""
    if kind == "vq":
        return VectorQuantizer(**kwargs)
    if kind == "fsq":
        return FSQ(**kwargs)
    raise ValueError(f"unknown quantizer kind {kind!r}; expected 'vq' or 'fsq'")
