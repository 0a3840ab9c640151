"""Digit classifiers used as judges: `reward` (optimised against by RL fine-tuning) and
`evaluator` (used only to score samples, FID in its feature space). Two architectures with
different inductive biases keep a generator that fools one from automatically fooling the other.
"""

from __future__ import annotations

import math

import torch
from torch import nn

ARCHS = ("cnn", "resnet", "mlp")


def _num_stages(image_size: int) -> int:
    """Downsampling stages: two for 8x8 inputs, three from 16x16 up."""
    return max(1, min(3, int(math.log2(image_size)) - 1))


def _conv_bn(c_in: int, c_out: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]


class _BasicBlock(nn.Module):
    """Residual block with an optional strided 1x1 projection on the shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            *_conv_bn(c_in, c_out, stride),
            nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False),
            nn.BatchNorm2d(c_out),
        )
        self.skip = (
            nn.Identity()
            if stride == 1 and c_in == c_out
            else nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.skip(x))


def _cnn(in_channels: int, width: int, stages: int) -> tuple[nn.Module, int]:
    """VGG-style: per stage two conv-BN-ReLU then 2x2 max-pool; width doubles per stage."""
    layers: list[nn.Module] = []
    c_in = in_channels
    for i in range(stages):
        c = width * 2**i
        layers += [*_conv_bn(c_in, c), *_conv_bn(c, c), nn.MaxPool2d(2)]
        c_in = c
    return nn.Sequential(*layers), c_in


def _resnet(in_channels: int, width: int, stages: int) -> tuple[nn.Module, int]:
    """ResNet-style: conv stem, then per stage one residual block, strided after the first."""
    layers: list[nn.Module] = _conv_bn(in_channels, width)
    c_in = width
    for i in range(stages):
        c = width * 2**i
        layers.append(_BasicBlock(c_in, c, stride=1 if i == 0 else 2))
        c_in = c
    return nn.Sequential(*layers), c_in


def _mlp(in_features: int, width: int) -> tuple[nn.Module, int]:
    """Two hidden layers on raw pixels: no convolution, no translation prior."""
    return (
        nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_features, width),
            nn.LayerNorm(width),
            nn.GELU(),
            nn.Linear(width, width),
            nn.LayerNorm(width),
            nn.GELU(),
        ),
        width,
    )


class Classifier(nn.Module):
    """Image classifier with a `features` method for the penultimate representation.

    arch: "cnn" (conv-BN, max-pool), "resnet" (residual conv-BN) or "mlp" (pixels -> 2 layers).
    `features(x)` is (B, F): spatially averaged for the conv nets; it is the space FID uses.
    """

    def __init__(
        self,
        arch: str,
        in_channels: int,
        image_size: int,
        num_classes: int,
        width: int = 32,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown classifier arch {arch!r}; expected one of {ARCHS}")
        self.arch = arch
        stages = _num_stages(image_size)
        if arch == "cnn":
            self.body, self.feature_dim = _cnn(in_channels, width, stages)
        elif arch == "resnet":
            self.body, self.feature_dim = _resnet(in_channels, width, stages)
        else:
            self.body, self.feature_dim = _mlp(in_channels * image_size**2, width)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.feature_dim, num_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        # A plain mean, not AdaptiveAvgPool2d, whose CUDA backward is not deterministic.
        return h.mean(dim=(2, 3)) if h.ndim == 4 else h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
