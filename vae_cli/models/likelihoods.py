"""Decoder likelihoods p(x|z): what the decoder's output means and how to score an image under it."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vae_cli.core.registry import Registry
from vae_cli.models import losses


class ImageLikelihood(nn.Module):
    """What every image likelihood offers besides nll/mean: how it is built for an image's channels and the
    recipe, and how many decoder output channels it reads (default: one parameter per pixel value)."""

    @classmethod
    def for_image(cls, channels: int, cfg) -> nn.Module:
        return cls()

    @staticmethod
    def out_channels(channels: int, cfg) -> int:
        return channels


class Bernoulli(ImageLikelihood):
    """Decoder output = per-pixel logits; images in [0, 1]. Logits keep BCE safe under autocast."""

    discretised = False  # a probability of the file only for binary images

    def nll(self, out: Tensor, x: Tensor, levels: int | None = None) -> Tensor:
        # Binary images are already discrete; on grey images this is the usual relaxation (`levels` unused).
        return losses.bernoulli_nll(out, x)

    def mean(self, out: Tensor) -> Tensor:
        return torch.sigmoid(out.float())


class Gaussian(ImageLikelihood):
    """Decoder output = per-pixel mean through a sigmoid (images in [0, 1]); one learned log standard
    deviation. With `vector=True` (M1+M2's latent codes): identity mean and one scale per dimension."""

    discretised = True  # with `levels`, the probability of each pixel's bin

    def __init__(self, dims: int = 1, vector: bool = False) -> None:
        super().__init__()
        self.vector = vector
        self.log_scale = nn.Parameter(torch.full((dims,), 0.0 if vector else -2.0))

    def nll(self, out: Tensor, x: Tensor, levels: int | None = None) -> Tensor:
        """A density on [0, 1] by default; with `levels`, the probability of x's bin on that grid."""
        scale = self.log_scale.clamp(-7.0, 2.0)
        if levels is not None and not self.vector:
            return losses.discretized_gaussian_nll(self.mean(out), scale, x, levels)
        return losses.gaussian_nll(self.mean(out), scale, x)

    def mean(self, out: Tensor) -> Tensor:
        return out.float() if self.vector else torch.sigmoid(out.float())


class Logistic(ImageLikelihood):
    """Decoder output = per-pixel mean through a sigmoid; a learned log-scale per channel. The probability
    of each pixel's 8-bit value (its bin of a discretised logistic, PixelCNN++), so the ELBO and IWAE numbers
    are the probability of the image file and bits/dim compares with image-modelling papers. The default
    for colour photos: a Gaussian density on [0, 1] is not a probability of the 8-bit file, and Bernoulli
    logits treat colour intensities as coin flips (CIFAR-10's test "ELBO" of -1,860 nats meant nothing)."""

    discretised = True
    LEVELS = 256  # training data is 8-bit unless the dataset says otherwise (`levels`)

    @classmethod
    def for_image(cls, channels: int, cfg) -> nn.Module:
        return cls(channels)

    def __init__(self, channels: int = 3) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.full((channels, 1, 1), -3.0))

    def nll(self, out: Tensor, x: Tensor, levels: int | None = None) -> Tensor:
        scale = self.log_scale.clamp(-7.0, 2.0)
        return losses.discretized_logistic_nll(self.mean(out), scale, x, levels or self.LEVELS)

    def mean(self, out: Tensor) -> Tensor:
        return torch.sigmoid(out.float())


class LogisticMixture(ImageLikelihood):
    """Decoder output = per pixel, `model.mixtures` components each with a weight, a mean and a log-scale per
    channel and, for colour, three coupling coefficients (green on red, blue on red and green): the discretised
    logistic mixture of PixelCNN++ (Salimans et al. 2017), the likelihood of VDVAE and NVAE. One component can
    be a sharp edge's two sides or a colour, where one logistic per channel has to blur both; the coupling
    lets it model colours rather than three independent channels. A probability of the 8-bit file, as
    `logistic` is."""

    discretised = True
    LEVELS = Logistic.LEVELS

    def __init__(self, channels: int = 3, mixtures: int = 10) -> None:
        super().__init__()
        if channels not in (1, 3):
            raise ValueError(f"logistic_mixture models grey or RGB images, not {channels} channels")
        self.c, self.m = channels, mixtures

    @classmethod
    def for_image(cls, channels: int, cfg) -> nn.Module:
        return cls(channels, cfg.mixtures)

    @staticmethod
    def out_channels(channels: int, cfg) -> int:
        return cfg.mixtures * (1 + 2 * channels + (3 if channels == 3 else 0))

    def _split(self, out: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """(logit_pi (B,M,H,W), means, log_scales (B,M,C,H,W), coeffs (B,M,3,H,W) or None) from the output."""
        b, _, h, w = out.shape
        out = out.float().contiguous()  # NCHW: the channel slices below are then plain views
        m, c = self.m, self.c
        # split, not slices: a slice's backward fills a zero tensor the output's size for every piece
        logit_pi, rest = out.split([m, out.shape[1] - m], 1)
        k = 3 if c == 3 else 0
        means, log_scales, coeffs = rest.reshape(b, m, 2 * c + k, h, w).split([c, c, k], 2)
        # the means start near mid-grey; log-scales are bounded below as in PixelCNN++ (a bin is 1/255 wide)
        return logit_pi, means + 0.5, log_scales.clamp(min=-7.0), torch.tanh(coeffs) if k else None

    def nll(self, out: Tensor, x: Tensor, levels: int | None = None) -> Tensor:
        logit_pi, means, log_scales, coeffs = self._split(out)
        return losses.discretized_mixture_nll(logit_pi, means, log_scales, coeffs, x, levels or self.LEVELS)

    def mean(self, out: Tensor) -> Tensor:
        """The expected image: each channel's mixture mean, green and blue coupled to the expected red/green."""
        logit_pi, means, _, coeffs = self._split(out)
        pi = torch.softmax(logit_pi, 1)[:, :, None]  # (B, M, 1, H, W)
        if coeffs is None:
            return (pi * means).sum(1).clamp(0, 1)
        r = (pi[:, :, 0] * means[:, :, 0]).sum(1, keepdim=True).clamp(0, 1)
        g = (pi[:, :, 0] * (means[:, :, 1] + coeffs[:, :, 0] * r)).sum(1, keepdim=True).clamp(0, 1)
        b = (pi[:, :, 0] * (means[:, :, 2] + coeffs[:, :, 1] * r + coeffs[:, :, 2] * g)).sum(1, keepdim=True)
        return torch.cat([r, g, b.clamp(0, 1)], 1)


LIKELIHOODS: Registry[type[ImageLikelihood]] = Registry("likelihood", "model.likelihood")
LIKELIHOODS.add("bernoulli", Bernoulli)
LIKELIHOODS.add("gaussian", Gaussian)
LIKELIHOODS.add("logistic", Logistic)
LIKELIHOODS.add("logistic_mixture", LogisticMixture)


def make_likelihood(cfg, shape: tuple[int, ...]) -> nn.Module:
    """The recipe's likelihood (`model.likelihood`) for images; a per-dimension Gaussian for vector inputs.
    Its `out_channels(channels, cfg)` says how many channels the decoder must output."""
    if len(shape) != 3:
        return Gaussian(shape[0], vector=True)
    return LIKELIHOODS.get(cfg.likelihood).for_image(shape[0], cfg)


def decoder_channels(cfg, shape: tuple[int, ...]) -> int | None:
    """The decoder's output channels for the recipe's likelihood (None for vector inputs: one per dimension)."""
    return LIKELIHOODS.get(cfg.likelihood).out_channels(shape[0], cfg) if len(shape) == 3 else None
