"""Encoder and decoder backbones sized from the input shape, chosen by `model.backbone`/`model.decoder`.

- `small` (default): a 3x3 stem, then 4x4 stride-2 convolutions while the feature map is even and at least
  8 pixels on each side (8x8 -> 4x4; 28x28 -> 7x7; 32x32 -> 4x4), doubling channels up to 8x `width`;
  SiLU, no normalisation. The decoder mirrors it with transposed convolutions.
- `deep`: the classic stack of six 3x3 stride-2 convolutions with `width` x 1, 2, 4, 8, 16, 32 channels
  (32..1024 at the default width), each with batch norm and LeakyReLU, mirrored by transposed convolutions
  (output padding chosen per layer so any size round-trips exactly).
- `resnet`: for colour photos, after the fastest known CIFAR-10 trainers (Keller Jordan's airbench, Page's
  "How to train your ResNet"): a 3x3 stem of `width` channels, then per stage a 3x3 conv, 2x2 max-pool,
  batch norm, GELU and a residual pair of 3x3 convs with batch norm, doubling channels (`width` x 2, 4, 8)
  while the map is even and at least 8 pixels; global max-pool to the features. Batch norm stays in the
  encoder trunk, which M2 runs once per image (never over its class enumeration). Its decoder mirrors it
  with nearest upsampling and residual convs, without normalisation.
- `mlp`: fully connected layers (`hidden` units) on the flattened input; also the only choice for vector
  inputs (M1+M2). It has no channels, so `model.width` does not apply to it.
Encoders map x -> features (B, out_dim); decoders map a code (B, in_dim) -> per-pixel parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from vae_cli.core import rng
from vae_cli.core.registry import Registry

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


class DeepEncoder(nn.Module):
    """The classic stack. It runs in float32 even under autocast: on this CPU's bf16 kernels, its 3x3
    convolutions over 1x1 maps (28x28 shrinks to 1x1 by the fifth layer) gave non-finite gradients within
    two steps, in the encoder and in the decoder's transposed convolutions alike."""

    MULTIPLIERS = (1, 2, 4, 8, 16, 32)  # x width: 32..1024 at the default width of 32

    def __init__(self, image_shape: tuple[int, int, int], width: int, hidden: int):
        super().__init__()
        c, h, w = image_shape
        layers: list[nn.Module] = []
        self.sizes = [(h, w)]
        for c_out in deep_channels(width):
            layers += [nn.Conv2d(c, c_out, 3, stride=2, padding=1), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2)]
            c, h, w = c_out, (h + 1) // 2, (w + 1) // 2
            self.sizes.append((h, w))
        layers += [nn.Flatten(), nn.Linear(c * h * w, hidden), nn.LeakyReLU(0.2)]
        self.net = nn.Sequential(*layers)
        self.out_dim = hidden

    def forward(self, x: Tensor) -> Tensor:
        return fp32(self.net, x)


def deep_channels(width: int) -> tuple[int, ...]:
    return tuple(width * m for m in DeepEncoder.MULTIPLIERS)


class DeepDecoder(nn.Module):
    def __init__(self, image_shape: tuple[int, int, int], width: int, hidden: int, in_dim: int,
                 out_channels: int | None = None):
        super().__init__()
        sizes = DeepEncoder(image_shape, width, 1).sizes  # the encoder's feature map sizes, to mirror
        chans = deep_channels(width)[::-1]
        self.start = (chans[0], *sizes[-1])
        self.fc = nn.Sequential(nn.Linear(in_dim, chans[0] * sizes[-1][0] * sizes[-1][1]), nn.LeakyReLU(0.2))
        layers: list[nn.Module] = []
        rev = sizes[::-1]
        for i, (src, dst) in enumerate(zip(rev, rev[1:])):
            c_in, c_out = chans[i], chans[i + 1] if i + 1 < len(chans) else chans[-1]
            pad = tuple(d - ((s - 1) * 2 - 2 + 3) for s, d in zip(src, dst))  # output_padding hits dst exactly
            layers += [nn.ConvTranspose2d(c_in, c_out, 3, stride=2, padding=1, output_padding=pad),
                       nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2)]
        self.net = nn.Sequential(*layers)
        self.out = nn.Conv2d(chans[-1], out_channels or image_shape[0], 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        # float32 throughout, as in DeepEncoder (bf16 transposed convolutions over 1x1 maps: non-finite grads)
        return fp32(nn.Sequential(self.fc, nn.Unflatten(1, self.start), self.net, self.out), z)


class MLPEncoder(nn.Module):
    def __init__(self, shape: tuple[int, ...], width: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(shape), hidden), _act(),
                                 nn.Linear(hidden, hidden), _act())
        self.out_dim = hidden

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class MLPDecoder(nn.Module):
    def __init__(self, shape: tuple[int, ...], width: int, hidden: int, in_dim: int,
                 out_channels: int | None = None):
        super().__init__()
        # images: out_channels maps of the image's size (the likelihood's parameters); vectors: the vector
        self.shape = (out_channels or shape[0], *shape[1:]) if len(shape) == 3 else tuple(shape)
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), _act(), nn.Linear(hidden, hidden), _act())
        self.out = nn.Linear(hidden, math.prod(shape))

    def forward(self, z: Tensor) -> Tensor:
        return fp32(self.out, self.net(z)).view(z.shape[0], *self.shape)


def res_plan(image_shape: tuple[int, int, int], width: int) -> ConvPlan:
    """The residual stack's stages: the stem's channels, then one entry per pooling stage (at most 3)."""
    _, h, w = image_shape
    channels = [width]
    while len(channels) <= 3 and h % 2 == 0 and w % 2 == 0 and min(h, w) >= 8:
        h, w = h // 2, w // 2
        channels.append(width * 2 ** len(channels))
    return ConvPlan(channels, (h, w))


class _Residual(nn.Module):
    """x + f(x), with f two 3x3 convs (batch norm after each when `norm`)."""

    def __init__(self, c: int, norm: bool):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(c, c, 3, padding=1, bias=not norm)]
        layers += [nn.BatchNorm2d(c), nn.GELU()] if norm else [nn.GELU()]
        layers += [nn.Conv2d(c, c, 3, padding=1, bias=not norm)]
        layers += [nn.BatchNorm2d(c)] if norm else []
        self.f = nn.Sequential(*layers)
        self.act = nn.GELU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(x + self.f(x))


class ResEncoder(nn.Module):
    """x (B,C,H,W) -> globally max-pooled features (B, channels of the last stage)."""

    def __init__(self, image_shape: tuple[int, int, int], width: int, hidden: int):
        super().__init__()
        plan = res_plan(image_shape, width)
        layers: list[nn.Module] = [nn.Conv2d(image_shape[0], plan.channels[0], 3, padding=1, bias=False),
                                   nn.BatchNorm2d(plan.channels[0]), nn.GELU()]
        for c_in, c_out in zip(plan.channels, plan.channels[1:]):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.MaxPool2d(2), nn.BatchNorm2d(c_out),
                       nn.GELU(), _Residual(c_out, norm=True)]
        layers += [nn.AdaptiveMaxPool2d(1), nn.Flatten()]
        self.net = nn.Sequential(*layers)
        self.out_dim = plan.channels[-1]

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class ResDecoder(nn.Module):
    """z (B, in_dim) -> per-pixel parameters: the encoder's stages in reverse, nearest upsampling."""

    def __init__(self, image_shape: tuple[int, int, int], width: int, hidden: int, in_dim: int,
                 out_channels: int | None = None):
        super().__init__()
        plan = res_plan(image_shape, width)
        self.plan = plan
        self.fc = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, plan.flat), nn.GELU())
        layers: list[nn.Module] = [_Residual(plan.channels[-1], norm=False)]
        rev = plan.channels[::-1]
        for c_in, c_out in zip(rev, rev[1:]):
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c_in, c_out, 3, padding=1), nn.GELU(),
                       _Residual(c_out, norm=False)]
        self.net = nn.Sequential(*layers)
        self.out = nn.Conv2d(plan.channels[0], out_channels or image_shape[0], 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.net(self.fc(z).view(z.shape[0], self.plan.channels[-1], *self.plan.out_hw))
        return fp32(self.out, h)


@dataclass(frozen=True)
class Backbone:
    """An encoder/decoder pair; both take (shape, width, hidden[, in_dim])."""

    encoder: type[nn.Module]
    decoder: type[nn.Module]
    uses_width: bool = True  # whether `model.width` sizes it (the MLP has no channels)
    # whether `model.hidden` sizes the encoder / the decoder (the resnet encoder ends in global pooling, the deep
    # decoder starts from its feature map: neither has a hidden layer)
    encoder_hidden: bool = True
    decoder_hidden: bool = True


BACKBONES: Registry[Backbone] = Registry("backbone", "model.backbone")
BACKBONES.add("small", Backbone(Encoder, Decoder))
BACKBONES.add("deep", Backbone(DeepEncoder, DeepDecoder, decoder_hidden=False))
BACKBONES.add("resnet", Backbone(ResEncoder, ResDecoder, encoder_hidden=False))
BACKBONES.add("mlp", Backbone(MLPEncoder, MLPDecoder, uses_width=False))


def make_encoder(shape: tuple[int, ...], cfg) -> nn.Module:
    name = cfg.backbone if len(shape) == 3 else "mlp"  # vectors (M1+M2's latent codes) need the MLP
    return BACKBONES.get(name).encoder(shape, cfg.width, cfg.hidden)


def make_decoder(shape: tuple[int, ...], cfg, in_dim: int, out_channels: int | None = None) -> nn.Module:
    """The recipe's decoder from codes of `in_dim` to `out_channels` maps of the image's size (the likelihood's
    parameters per pixel; None: one per image channel)."""
    name = (cfg.decoder or cfg.backbone) if len(shape) == 3 else "mlp"
    return BACKBONES.get(name).decoder(shape, cfg.width, cfg.hidden, in_dim, out_channels)


def mlp(in_dim: int, hidden: int, out_dim: int, dropout: float = 0.0) -> nn.Module:
    """A one-hidden-layer perceptron (or a linear map when hidden == 0)."""
    if hidden == 0:
        return nn.Linear(in_dim, out_dim)
    return nn.Sequential(nn.Linear(in_dim, hidden), _act(), rng.Dropout(dropout), nn.Linear(hidden, out_dim))


def one_hot(y: Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> Tensor:
    return nn.functional.one_hot(y, num_classes).to(dtype)
