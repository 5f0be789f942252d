"""Convolutional encoder and decoder blocks sized from the image shape.

Both are built from the same plan: a 3x3 stem, then stride-2 convolutions while the feature map is even
and at least 8 pixels on each side (8x8 -> 4x4; 28x28 -> 7x7; 32x32 -> 4x4), doubling channels up to
8x `width`. The decoder mirrors the plan with transposed convolutions, so any image shape round-trips
exactly without per-dataset code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

MAX_DOWNSAMPLES = 4


@dataclass(frozen=True)
class ConvPlan:
    channels: list[int]  # channels after the stem and after each downsampling
    out_hw: tuple[int, int]  # feature map size after the last downsampling

    @property
    def flat(self) -> int:
        return self.channels[-1] * self.out_hw[0] * self.out_hw[1]


def conv_plan(image_shape: tuple[int, int, int], width: int) -> ConvPlan:
    _, h, w = image_shape
    channels = [width]
    while len(channels) <= MAX_DOWNSAMPLES and h % 2 == 0 and w % 2 == 0 and min(h, w) >= 8:
        h, w = h // 2, w // 2
        channels.append(min(channels[-1] * 2, 8 * width))
    return ConvPlan(channels, (h, w))


def _act() -> nn.Module:
    return nn.SiLU()


class Encoder(nn.Module):
    """x (B,C,H,W) -> features (B, hidden)."""

    def __init__(self, image_shape: tuple[int, int, int], width: int, hidden: int):
        super().__init__()
        plan = conv_plan(image_shape, width)
        layers: list[nn.Module] = [nn.Conv2d(image_shape[0], plan.channels[0], 3, padding=1), _act()]
        for c_in, c_out in zip(plan.channels, plan.channels[1:]):
            layers += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), _act()]
        layers += [nn.Flatten(), nn.Linear(plan.flat, hidden), _act()]
        self.net = nn.Sequential(*layers)
        self.out_dim = hidden

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class Decoder(nn.Module):
    """z (B, in_dim) -> per-pixel parameters (B, out_channels, H, W), e.g. Bernoulli logits."""

    def __init__(self, image_shape: tuple[int, int, int], width: int, hidden: int, in_dim: int,
                 out_channels: int | None = None):
        super().__init__()
        plan = conv_plan(image_shape, width)
        self.plan = plan
        self.fc = nn.Sequential(nn.Linear(in_dim, hidden), _act(), nn.Linear(hidden, plan.flat), _act())
        layers: list[nn.Module] = []
        rev = plan.channels[::-1]
        for c_in, c_out in zip(rev, rev[1:]):
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1), _act()]
        self.net = nn.Sequential(*layers)
        self.out = nn.Conv2d(plan.channels[0], out_channels or image_shape[0], 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.net(self.fc(z).view(z.shape[0], self.plan.channels[-1], *self.plan.out_hw))
        return fp32(self.out, h)


def fp32(layer: nn.Module, h: Tensor) -> Tensor:
    """Run `layer` in float32 even under autocast. Output layers that feed likelihoods and the latent
    posterior lose measurable ELBO when rounded to bf16 (a learned Gaussian scale punishes it)."""
    with torch.autocast(h.device.type, enabled=False):
        return layer(h.float())


def mlp(in_dim: int, hidden: int, out_dim: int, dropout: float = 0.0) -> nn.Module:
    """A one-hidden-layer perceptron (or a linear map when hidden == 0)."""
    if hidden == 0:
        return nn.Linear(in_dim, out_dim)
    return nn.Sequential(nn.Linear(in_dim, hidden), _act(), nn.Dropout(dropout), nn.Linear(hidden, out_dim))


def one_hot(y: Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> Tensor:
    return nn.functional.one_hot(y, num_classes).to(dtype)
