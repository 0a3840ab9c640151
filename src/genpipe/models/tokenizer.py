"""Stage-1 tokenizer: image <-> grid of discrete codes (encoder -> quantizer -> decoder)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from genpipe.models.autoencoder import Decoder, Encoder
from genpipe.models.quantizer import Stats, build_quantizer


class VQAutoencoder(nn.Module):
    """Images in [0, 1] (B, C, H, W) -> codes (B, H/f, W/f) -> images in [0, 1].

    f = 2**(len(channels) - 1) is the encoder's downsampling factor.

    The decoder's output goes through a sigmoid rather than a clamp: the training loss then
    sees exactly the image that is evaluated and decoded, and every pixel keeps a gradient
    (a clamp would zero it wherever the decoder overshoots).

    `quantizer_kwargs` go to `build_quantizer(quantizer, dim=embed_dim, ...)`. The "latent"
    of `encode`, `codes_to_latent`, `latent_to_codes` and `decode_latent` is the quantizer's
    code space, `latent_dim` channels: `latent_to_codes(encode(x)) == encode_codes(x)`.
    """

    def __init__(
        self,
        in_channels: int,
        channels: tuple[int, ...],
        num_res_blocks: int,
        embed_dim: int,
        quantizer: str = "vq",
        **quantizer_kwargs: Any,
    ) -> None:
        super().__init__()
        self.encoder = Encoder(in_channels, channels, num_res_blocks, embed_dim)
        self.quantizer = build_quantizer(quantizer, dim=embed_dim, **quantizer_kwargs)
        self.decoder = Decoder(in_channels, channels, num_res_blocks, embed_dim)

    @property
    def codebook_size(self) -> int:
        return self.quantizer.codebook_size

    @property
    def latent_dim(self) -> int:
        return self.quantizer.code_dim

    def grid(self, image_size: int | tuple[int, int]) -> tuple[int, int]:
        """Code grid (h, w) for an image of `image_size` (an int means square)."""
        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
        f = self.encoder.downsample
        if h % f or w % f:
            raise ValueError(f"image size {(h, w)} is not divisible by the downsampling factor {f}")
        return h // f, w // f

    def _decode(self, z_q: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.decoder(z_q))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Stats]:
        """x (B, C, H, W) -> (reconstruction, codes (B, h, w), quantizer loss, quantizer stats)."""
        z_q, codes, q_loss, stats = self.quantizer(self.encoder(x))
        return self._decode(z_q), codes, q_loss, stats

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Continuous pre-quantisation latent (B, latent_dim, h, w)."""
        return self.quantizer.project(self.encoder(x))

    def encode_codes(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantizer.latent_to_codes(self.encode(x))

    def codes_to_latent(self, codes: torch.Tensor) -> torch.Tensor:
        return self.quantizer.codes_to_latent(codes)

    def latent_to_codes(self, latent: torch.Tensor) -> torch.Tensor:
        return self.quantizer.latent_to_codes(latent)

    def decode_latent(self, latent: torch.Tensor) -> torch.Tensor:
        """Latent (B, latent_dim, h, w) -> images in [0, 1]; the latent is not snapped to codes."""
        return self._decode(self.quantizer.unproject(latent))

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        return self.decode_latent(self.codes_to_latent(codes))
