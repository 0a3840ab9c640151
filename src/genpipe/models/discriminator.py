"""Optional adversarial and perceptual terms for the tokenizer (VQGAN-style)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class PatchDiscriminator(nn.Module):
    """PatchGAN: one real/fake logit per patch. Each of `num_layers` halves the resolution, so
    8x8 inputs suit 1 layer (4x4 logits) and 32x32 inputs 2-3. GroupNorm, not BatchNorm, so a
    logit never depends on the other images in the batch."""

    def __init__(self, in_channels: int = 1, channels: int = 64, num_layers: int = 1) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, channels, 3, padding=1),
            nn.LeakyReLU(0.2),
        ]
        ch = channels
        for _ in range(num_layers):
            layers += [
                nn.Conv2d(ch, ch * 2, 4, stride=2, padding=1),
                nn.GroupNorm(math.gcd(8, ch * 2), ch * 2),
                nn.LeakyReLU(0.2),
            ]
            ch *= 2
        layers.append(nn.Conv2d(ch, 1, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean())


def hinge_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    return -fake_logits.mean()


def adaptive_weight(
    rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor, max_weight: float
) -> torch.Tensor:
    """Balance the GAN term against reconstruction at the decoder's last layer (VQGAN):
    ||d rec / d W|| / (||d g / d W|| + 1e-4), clamped to [0, max_weight], no gradient."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = rec_grad.norm() / (g_grad.norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()


class PerceptualLoss(nn.Module):
    """Mean squared distance between a frozen network's features of two image batches.

    `feature_net` maps images to a feature map or a sequence of them (then the distances are
    averaged); it is frozen and kept in eval mode even when the owner calls `.train()`."""

    def __init__(self, feature_net: nn.Module) -> None:
        super().__init__()
        self.net = feature_net.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> PerceptualLoss:
        super().train(mode)
        self.net.eval()
        return self

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = self.net(x)
        return [out] if isinstance(out, torch.Tensor) else list(out)

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target_feats = self._features(target)
        feats = self._features(x)
        return torch.stack([F.mse_loss(f, t) for f, t in zip(feats, target_feats)]).mean()
