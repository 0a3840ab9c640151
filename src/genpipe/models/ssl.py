"""Self-supervised pretraining of the tokenizer's encoder: SimCLR (NT-Xent over two augmented
views) and MAE (reconstruct masked patches), plus the batched, seedable augmentations they need.

Features for probes are the encoder's output grid averaged over space (`encoder_features`), so a
probe sees what the encoder learned rather than where pixels sit.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import tv_tensors
from torchvision.transforms import v2


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def encoder_features(encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, F): the encoder's output averaged over its spatial grid.

    A plain mean rather than AdaptiveAvgPool2d, whose CUDA backward is not deterministic.
    """
    return encoder(x).mean(dim=(2, 3))


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent: each of the 2N views must pick its partner among the other 2N-1 views.

    Cosine similarities divided by `temperature`; self-similarity is excluded from the softmax;
    the loss is the mean over all 2N anchors.
    """
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"nt_xent needs two (N, D) tensors of one shape: {z1.shape}, {z2.shape}")
    z1, z2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    z = torch.cat([z1, z2])
    logits = z @ z.T / temperature
    self_mask = torch.eye(z.shape[0], dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    # logsumexp minus the positive logit, not cross_entropy: NLLLoss is on PyTorch's list of ops
    # that raise under deterministic mode on CUDA.
    positive = (z1 * z2).sum(dim=1).repeat(2) / temperature
    return (logits.logsumexp(dim=1) - positive).mean()


class SimCLR(nn.Module):
    """Encoder -> spatial mean -> MLP projection head; forward(view1, view2) gives the NT-Xent loss.

    The head is discarded after pretraining: probes and the tokenizer use the encoder alone.
    For data-parallel training set `gather` to a differentiable gather of every rank's rows
    in global order: the negatives are then the whole global batch, as on one process.
    """

    def __init__(
        self,
        encoder: nn.Module,
        feature_dim: int,
        proj_hidden: int = 256,
        proj_dim: int = 64,
        temperature: float = 0.2,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Sequential(
            nn.Linear(feature_dim, proj_hidden),
            nn.BatchNorm1d(proj_hidden),
            nn.ReLU(),
            nn.Linear(proj_hidden, proj_dim),
        )
        self.temperature = temperature
        self.gather: Callable[[torch.Tensor], torch.Tensor] = _identity

    def forward(self, view1: torch.Tensor, view2: torch.Tensor) -> torch.Tensor:
        # One encoder pass over both views, so BatchNorm in the head sees a single batch.
        z = self.head(encoder_features(self.encoder, torch.cat([view1, view2])))
        z1, z2 = z.chunk(2)
        return nt_xent(self.gather(z1), self.gather(z2), self.temperature)


def random_patch_mask(
    batch: int, num_patches: int, ratio: float, generator: torch.Generator
) -> torch.Tensor:
    """(batch, num_patches) bool mask with exactly round(ratio * num_patches) True per row.

    The rank of uniform scores picks the masked set, so every row has the same count and the draw
    depends only on `generator` (on the generator's device).
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"mask ratio must be in [0, 1], got {ratio}")
    k = round(ratio * num_patches)
    scores = torch.rand(batch, num_patches, generator=generator, device=generator.device)
    ranks = scores.argsort(dim=1, stable=True).argsort(dim=1, stable=True)
    return ranks < k


def _patch_to_pixel_mask(mask: torch.Tensor, grid: tuple[int, int], patch: int) -> torch.Tensor:
    """(B, gh*gw) patch mask -> (B, 1, gh*patch, gw*patch) pixel mask."""
    b = mask.shape[0]
    m = mask.view(b, 1, grid[0], grid[1])
    return m.repeat_interleave(patch, dim=2).repeat_interleave(patch, dim=3)


def mae_loss(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, patch_size: int
) -> torch.Tensor:
    """Mean squared error over the pixels of masked patches only; visible patches carry no loss."""
    h, w = target.shape[-2:]
    pix = _patch_to_pixel_mask(mask, (h // patch_size, w // patch_size), patch_size)
    pix = pix.to(target.dtype).expand_as(target)
    return ((pred - target).square() * pix).sum() / pix.sum().clamp(min=1.0)


class MAE(nn.Module):
    """Masked autoencoder for a convolutional encoder.

    Masked patches are replaced, in pixel space, by a learned mask patch (initialised to zero),
    so the encoder keeps its input shape and can still learn to tell "hidden" from "blank
    background". A light decoder (3x3 conv, SiLU, 1x1 conv, pixel shuffle) maps the latent grid
    back to pixels; the loss is the MSE on masked patches only (`mae_loss`). On 8x8 digits
    single-pixel patches (patch_size=1) probe better than 2x2 ones.
    """

    def __init__(
        self,
        encoder: nn.Module,
        feature_dim: int,
        in_channels: int,
        patch_size: int = 1,
        mask_ratio: float = 0.5,
        decoder_hidden: int = 64,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.patch_size = patch_size
        self.mask_ratio = mask_ratio
        self.mask_token = nn.Parameter(torch.zeros(in_channels, patch_size, patch_size))
        scale = int(getattr(encoder, "downsample", 1))
        self.decoder = nn.Sequential(
            nn.Conv2d(feature_dim, decoder_hidden, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(decoder_hidden, in_channels * scale * scale, 1),
            nn.PixelShuffle(scale),
        )

    def _grid(self, x: torch.Tensor) -> tuple[int, int]:
        h, w = x.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"image {h}x{w} is not divisible by patch_size={self.patch_size}")
        return h // self.patch_size, w // self.patch_size

    def predict(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Pixel prediction for every position, from the image with `mask`ed patches hidden."""
        gh, gw = self._grid(x)
        pix = _patch_to_pixel_mask(mask.to(x.device), (gh, gw), self.patch_size)
        token = self.mask_token.repeat(1, gh, gw).unsqueeze(0)
        return self.decoder(self.encoder(torch.where(pix, token, x)))

    def forward(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        gh, gw = self._grid(x)
        mask = random_patch_mask(x.shape[0], gh * gw, self.mask_ratio, generator).to(x.device)
        return mae_loss(self.predict(x, mask), x, mask, self.patch_size)


def _is_plain_tensor(x: Any) -> bool:
    return type(x) is torch.Tensor


class _BatchTransform(v2.Transform):
    """A v2 transform that draws independent parameters for every image of a (B, C, H, W) batch
    from its own torch.Generator, so a pipeline is reproducible from one seed and runs batched.

    Only images (plain tensors or tv_tensors.Image) are transformed; labels and other entries of
    a sample pass through unchanged.
    """

    _transformed_types = (tv_tensors.Image, _is_plain_tensor)

    def __init__(self, generator: torch.Generator) -> None:
        super().__init__()
        self.generator = generator

    def _draw(self, *shape: int) -> torch.Tensor:
        """Uniform [0, 1) numbers from this transform's generator (on the generator's device)."""
        return torch.rand(*shape, generator=self.generator, device=self.generator.device)

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        x = inpt.as_subclass(torch.Tensor)
        single = x.ndim == 3
        out = self.apply(x.unsqueeze(0) if single else x)
        out = out.squeeze(0) if single else out
        return tv_tensors.wrap(out, like=inpt) if isinstance(inpt, tv_tensors.Image) else out

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class RandomGeometry(_BatchTransform):
    """Per-image random resized crop, rotation, translation and optional elastic warp, composed
    into a single sampling grid so each image is resampled once (bilinear, zero fill).

    scale: range of the crop's area as a fraction of the image (values above 1 zoom out).
    ratio: range of the crop's aspect ratio (log-uniform). degrees: rotation in [-d, d].
    translate: shift in [-t, t] as a fraction of the image size.
    elastic_alpha: std of the smooth displacement field in pixels (0 disables it).
    elastic_sigma: its Gaussian correlation length in pixels.
    """

    def __init__(
        self,
        generator: torch.Generator,
        scale: tuple[float, float] = (0.6, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        degrees: float = 10.0,
        translate: float = 0.1,
        elastic_alpha: float = 0.0,
        elastic_sigma: float = 1.5,
    ) -> None:
        super().__init__(generator)
        self.scale = tuple(scale)
        self.ratio = tuple(ratio)
        self.degrees = degrees
        self.translate = translate
        self.elastic_alpha = elastic_alpha
        self.elastic_sigma = elastic_sigma

    def _theta(self, b: int) -> torch.Tensor:
        """(B, 2, 3) affine maps from output to input coordinates in [-1, 1] units."""
        u = self._draw(b, 7)
        area = self.scale[0] + (self.scale[1] - self.scale[0]) * u[:, 0]
        lo, hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        aspect = (lo + (hi - lo) * u[:, 1]).exp()
        sx, sy = (area * aspect).sqrt(), (area / aspect).sqrt()
        # Crop centre anywhere the crop stays inside the image, plus the requested translation.
        cx = (1 - sx).clamp(min=0) * (2 * u[:, 2] - 1) + 2 * self.translate * (2 * u[:, 4] - 1)
        cy = (1 - sy).clamp(min=0) * (2 * u[:, 3] - 1) + 2 * self.translate * (2 * u[:, 5] - 1)
        angle = math.radians(self.degrees) * (2 * u[:, 6] - 1)
        cos, sin = angle.cos(), angle.sin()
        return torch.stack(
            [torch.stack([sx * cos, -sx * sin, cx], 1), torch.stack([sy * sin, sy * cos, cy], 1)], 1
        )

    def _elastic(self, b: int, h: int, w: int) -> torch.Tensor:
        """(B, H, W, 2) smooth displacement, std `elastic_alpha` pixels, in [-1, 1] units."""
        noise = torch.randn(b, 2, h, w, generator=self.generator, device=self.generator.device)
        radius = max(1, int(3 * self.elastic_sigma))
        t = torch.arange(-radius, radius + 1, dtype=noise.dtype, device=noise.device)
        k1 = torch.exp(-0.5 * (t / self.elastic_sigma) ** 2)
        k1 = k1 / k1.square().sum().sqrt()  # unit-norm kernel keeps the field's std at 1
        padded = F.pad(noise, (radius,) * 4, mode="replicate")
        field = F.conv2d(padded, k1.view(1, 1, 1, -1).expand(2, 1, 1, -1), groups=2)
        field = F.conv2d(field, k1.view(1, 1, -1, 1).expand(2, 1, -1, 1), groups=2)
        scale = torch.tensor([2.0 / w, 2.0 / h], dtype=noise.dtype, device=noise.device)
        return self.elastic_alpha * field.permute(0, 2, 3, 1) * scale

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        theta = self._theta(b)
        grid = F.affine_grid(theta, [b, 1, h, w], align_corners=False)
        if self.elastic_alpha > 0:
            grid = grid + self._elastic(b, h, w)
        grid = grid.to(x)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class RandomGaussianNoise(_BatchTransform):
    """Adds N(0, std^2) pixel noise and clamps to `clip` (the data range), if given."""

    def __init__(
        self, generator: torch.Generator, std: float, clip: tuple[float, float] | None = (0.0, 1.0)
    ) -> None:
        super().__init__(generator)
        self.std = std
        self.clip = clip

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        noise = torch.randn(x.shape, generator=self.generator, device=self.generator.device)
        out = x + self.std * noise.to(x)
        return out.clamp(*self.clip) if self.clip is not None else out


def simclr_augment(
    generator: torch.Generator,
    scale: tuple[float, float] = (0.6, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    degrees: float = 10.0,
    translate: float = 0.1,
    elastic_alpha: float = 0.0,
    elastic_sigma: float = 1.5,
    noise_std: float = 0.05,
    clip: tuple[float, float] | None = (0.0, 1.0),
) -> v2.Compose:
    """A transforms.v2 pipeline of views for small grayscale digits, applied to a whole batch.

    No horizontal flip (digits are not mirror-invariant) and no colour jitter (one channel).
    Every random draw comes from `generator`, so reseeding it replays the same views; each image
    in a batch gets its own parameters.
    """
    steps: list[nn.Module] = [
        RandomGeometry(generator, scale, ratio, degrees, translate, elastic_alpha, elastic_sigma)
    ]
    if noise_std > 0:
        steps.append(RandomGaussianNoise(generator, noise_std, clip))
    return v2.Compose(steps)
