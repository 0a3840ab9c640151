"""Representation alignment (REPA, Yu et al. 2024) for the priors: a training-only MLP projects
one block's hidden states, and a cosine loss pulls them towards a frozen self-supervised
encoder's features of the clean image at the same grid position.

genpipe's SSL encoder has the tokenizer encoder's architecture, so its feature map lies on the
code grid cell by cell; `ssl_targets` refuses one that does not. Which hidden state sits at
cell i is the kind's: the denoiser's token i is noisy latent cell i (REPA's own case);
MaskGIT's token i is cell i, masked or not; AR's position i holds codes < i and predicts code
i (its rotary/learned position is cell i's), so it is aligned with cell i's feature: a
representation of the code it is about to draw, which the SSL feature at that cell sees
through the encoder's receptive field, neighbours and all. The head is not part of the served
prior: the stage saves the net alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn


class GridMismatch(ValueError):
    """The SSL encoder's feature map does not lie on the code grid."""


class AlignHead(nn.Module):
    """MLP (dim -> hidden -> hidden -> feature_dim, SiLU) from a prior's hidden states to the
    SSL feature space. Initialised from its own `seed` without touching the global RNG, so a
    prior trained with alignment draws the same dropout masks as one trained without."""

    def __init__(self, dim: int, feature_dim: int, hidden: int | None = None, seed: int = 0):
        super().__init__()
        hidden = hidden or 4 * dim
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.mlp = nn.Sequential(
                nn.Linear(dim, hidden),
                nn.SiLU(),
                nn.Linear(hidden, hidden),
                nn.SiLU(),
                nn.Linear(hidden, feature_dim),
            )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.mlp(hidden)


def cosine_align_loss(projected: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over samples and cells of 1 - cos(projected, target), both (B, L, F): 0 when every
    cell points the target's way, 2 when every cell points against it."""
    if projected.shape != target.shape:
        raise ValueError(
            f"alignment needs projected hidden states and SSL features of one shape (B, L, F), "
            f"got {tuple(projected.shape)} and {tuple(target.shape)}"
        )
    cos = F.cosine_similarity(projected.float(), target.float(), dim=-1)
    return (1.0 - cos).mean()


class AlignedPrior(nn.Module):
    """A prior net with its alignment head, trained together; only `net` is kept and served.
    `depth` names the block (1 = the first) whose output is aligned."""

    def __init__(self, net: nn.Module, head: AlignHead, depth: int) -> None:
        super().__init__()
        blocks = getattr(net, "blocks", None)
        if not isinstance(blocks, nn.ModuleList):
            raise ValueError(
                f"prior.align_weight: {type(net).__name__} has no `blocks` whose hidden states "
                "could be aligned; set prior.align_weight: 0"
            )
        if not 1 <= depth <= len(blocks):
            raise ValueError(
                f"prior.align_depth: must be in [1, {len(blocks)}] (the prior's blocks), "
                f"got {depth}"
            )
        self.net, self.head, self.depth = net, head, depth

    @contextlib.contextmanager
    def capture(self) -> Iterator[list[torch.Tensor]]:
        """While open, every forward of the net appends block `depth`'s output (B, L, dim)
        to the yielded list; the hook is removed on exit, so the net keeps no trace of it."""
        hidden: list[torch.Tensor] = []
        block = self.net.blocks[self.depth - 1]  # type: ignore[index]
        handle = block.register_forward_hook(lambda _m, _i, out: hidden.append(out))
        try:
            yield hidden
        finally:
            handle.remove()

    def align_loss(self, hidden: list[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        """Cosine loss of the one captured forward's projected hidden states to `target`."""
        if len(hidden) != 1:
            raise ValueError(
                f"alignment expects one forward of the net per loss, got {len(hidden)}"
            )
        return cosine_align_loss(self.head(hidden[0]), target)


@torch.no_grad()
def ssl_targets(
    encoder: nn.Module, images: torch.Tensor, grid: tuple[int, int], batch_size: int = 512
) -> torch.Tensor:
    """The frozen encoder's features of `images` (N, C, H, W) as (N, h*w, F), cells in raster
    order (the order of the code grid's cells); GridMismatch unless its map is `grid`."""
    encoder = encoder.eval()
    feats = torch.cat(
        [encoder(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    )
    if feats.ndim != 4 or tuple(feats.shape[2:]) != tuple(grid):
        raise GridMismatch(
            f"the SSL encoder's feature map is {tuple(feats.shape[2:])} but the code grid is "
            f"{tuple(grid)}: alignment needs one feature per code cell"
        )
    return feats.flatten(2).transpose(1, 2).contiguous()
