"""Convolutional residual encoder and decoder shared by the tokenizer and SSL pretraining."""

from __future__ import annotations

import torch
from torch import nn


def _norm(channels: int) -> nn.GroupNorm:
    groups = 8 if channels % 8 == 0 else 1
    return nn.GroupNorm(groups, channels)


class ResBlock(nn.Module):
    """Pre-activation residual block: two 3x3 convs with GroupNorm and SiLU."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            _norm(channels),
            nn.SiLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            _norm(channels),
            nn.SiLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class Encoder(nn.Module):
    """Image -> latent grid. Each entry of `channels` after the first halves the resolution.

    Output shape: (B, out_dim, H / 2**(len(channels)-1), W / 2**(len(channels)-1)).
    """

    def __init__(
        self, in_channels: int, channels: tuple[int, ...], num_res_blocks: int, out_dim: int
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels[0], 3, padding=1)]
        for i, ch in enumerate(channels):
            if i > 0:
                layers.append(nn.Conv2d(channels[i - 1], ch, 4, stride=2, padding=1))
            layers.extend(ResBlock(ch) for _ in range(num_res_blocks))
        layers += [_norm(channels[-1]), nn.SiLU(), nn.Conv2d(channels[-1], out_dim, 1)]
        self.net = nn.Sequential(*layers)
        self.downsample = 2 ** (len(channels) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Decoder(nn.Module):
    """Latent grid -> image; mirror of `Encoder`. Output is unbounded (logits of pixel values)."""

    def __init__(
        self, out_channels: int, channels: tuple[int, ...], num_res_blocks: int, in_dim: int
    ) -> None:
        super().__init__()
        rev = tuple(reversed(channels))
        layers: list[nn.Module] = [nn.Conv2d(in_dim, rev[0], 3, padding=1)]
        for i, ch in enumerate(rev):
            if i > 0:
                layers.append(nn.ConvTranspose2d(rev[i - 1], ch, 4, stride=2, padding=1))
            layers.extend(ResBlock(ch) for _ in range(num_res_blocks))
        layers += [_norm(rev[-1]), nn.SiLU()]
        self.net = nn.Sequential(*layers)
        self.out = nn.Conv2d(rev[-1], out_channels, 3, padding=1)

    @property
    def last_layer(self) -> torch.Tensor:
        """Weight used by the adaptive GAN weight (ratio of gradient norms)."""
        return self.out.weight

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.out(self.net(z))
