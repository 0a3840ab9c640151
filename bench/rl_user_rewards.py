"""User rewards for bench/rl_reward_gain.py and bench/rl_tilt_headroom.py, loaded through
`finetune.reward_entry_points` as a pipeline user would
(`{clean_background: "bench.rl_user_rewards:clean_background"}`): the image statistics an ML
engineer might plausibly want more of on digits (clean background, ink, uprightness, centring,
size, smoothness, crispness)."""

from __future__ import annotations

import torch

from genpipe.evaluation import knn_radii

BACKGROUND = 0.3  # pixel values below this are background, not stroke
RESIDUE_EPS = 1e-3  # keeps the log finite for a spotless image; ~1/20 of a sample's residue
SPREAD_FLOOR = 0.5  # pixel-space distance; a duplicate scores log(this), not -inf


def residue(images: torch.Tensor) -> torch.Tensor:
    """Mean faint residue (pixels below BACKGROUND) per image, (B,); differentiable in the
    images (a reward-gradient fine-tune backpropagates it)."""
    x = images.float().clamp(0, 1)
    return torch.where(x < BACKGROUND, x, torch.zeros_like(x)).flatten(1).mean(1)


def clean_background(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Minus the mean faint residue per image: decoded samples carry more of it than real
    digits (default digits pipeline: 0.026 against 0.018 on the test split), and unlike the
    8x8 PNG size it is continuous, so small moves are rewarded."""
    del labels
    return -residue(images)


def log_clean_background(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Minus the log of the residue: the same goal in relative terms, so halving a clean
    sample's residue earns as much as halving a dirty one's. On the prior's samples the
    residue is skewed (a tail of dirty samples), and its log is not: the linear reward's
    per-sample std is set by that tail, which a whole-distribution shift cannot move far."""
    del labels
    return -torch.log(residue(images) + RESIDUE_EPS)


def _ink_moments(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ink mass (B,), ink centroid (B, 2) as (row, col), ink-weighted second moments (B, 3):
    var(row), var(col), cov(row, col)); pixel coordinates over the whole image, channels summed."""
    x = images.detach().float().clamp(0, 1).sum(1)  # (B, H, W)
    h, w = x.shape[-2:]
    rows = torch.arange(h, dtype=x.dtype)[:, None].expand(h, w)
    cols = torch.arange(w, dtype=x.dtype)[None, :].expand(h, w)
    mass = x.flatten(1).sum(1).clamp_min(1e-6)
    r0 = (x * rows).flatten(1).sum(1) / mass
    c0 = (x * cols).flatten(1).sum(1) / mass
    dr, dc = rows - r0[:, None, None], cols - c0[:, None, None]
    moments = torch.stack(
        [(x * a * b).flatten(1).sum(1) / mass for a, b in ((dr, dr), (dc, dc), (dr, dc))], 1
    )
    return mass, torch.stack([r0, c0], 1), moments


def ink(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean pixel value: bolder, thicker strokes score higher."""
    del labels
    return images.detach().float().clamp(0, 1).flatten(1).mean(1)


def thin(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Minus the mean pixel value: finer strokes score higher."""
    return -ink(images, labels)


def upright(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Minus the absolute slant, cov(row, col) / var(row) of the ink: how far a column moves
    per row down the digit, 0 for an upright digit, whichever way it leans."""
    del labels
    _, _, m = _ink_moments(images)
    return -(m[:, 2] / m[:, 0].clamp_min(1e-6)).abs()


def centred(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Minus the distance of the ink's centroid from the image centre, in image heights."""
    del labels
    h, w = images.shape[-2:]
    _, centroid, _ = _ink_moments(images)
    centre = torch.tensor([(h - 1) / 2, (w - 1) / 2])
    return -(centroid - centre).norm(dim=1) / h


def size(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Radius of gyration of the ink, in image heights: larger digits score higher (unlike a
    bounding box, continuous, so small moves are rewarded)."""
    del labels
    _, _, m = _ink_moments(images)
    return (m[:, 0] + m[:, 1]).sqrt() / images.shape[-2]


def smooth(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Minus the total variation (mean absolute difference of neighbouring pixels)."""
    del labels
    x = images.detach().float().clamp(0, 1)
    down = (x[..., 1:, :] - x[..., :-1, :]).abs().flatten(1).mean(1)
    right = (x[..., 1:] - x[..., :-1]).abs().flatten(1).mean(1)
    return -(down + right)


def crisp(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean distance of the pixels from mid-grey, rescaled to [0, 1]: stroke or background,
    not in between."""
    del labels
    return (2 * (images.detach().float().clamp(0, 1) - 0.5).abs()).flatten(1).mean(1)


def group_spread(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Log of the distance to the nearest other image of the same label in the batch: a
    nearest-neighbour (Kozachenko-Leonenko) estimate of -log p_policy per image, up to scale and
    a constant, since RL scores one group of a label at a time. Added to a reward it is an
    entropy bonus that sees the *current* policy's crowding, which `realism` (against a frozen
    draw) does not: a group collapsing onto one style scores low (a duplicate log(SPREAD_FLOOR)).
    0 for a label seen once."""
    flat = images.detach().float().clamp(0, 1).flatten(1)
    dist = torch.cdist(flat, flat).masked_fill(labels[:, None] != labels[None, :], torch.inf)
    nearest = knn_radii(dist, torch.arange(len(labels)), 1)  # itself excluded
    return torch.where(nearest.isfinite(), nearest.clamp_min(SPREAD_FLOOR).log(), 0.0)
