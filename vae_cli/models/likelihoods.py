"""Decoder likelihoods p(x|z): what the decoder's output means and how to score an image under it."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vae_cli.core.registry import Registry
from vae_cli.models import losses


class Bernoulli(nn.Module):
    """Decoder output = per-pixel logits; images in [0, 1]. Logits keep BCE safe under autocast."""

    discretised = False  # a probability of the file only for binary images

    def nll(self, out: Tensor, x: Tensor, levels: int | None = None) -> Tensor:
        # Binary images are already discrete; on grey images this is the usual relaxation (`levels` unused).
        return losses.bernoulli_nll(out, x)

    def mean(self, out: Tensor) -> Tensor:
        return torch.sigmoid(out.float())


class Gaussian(nn.Module):
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


class Logistic(nn.Module):
    """Decoder output = per-pixel mean through a sigmoid; a learned log-scale per channel. The probability
    of each pixel's 8-bit value (its bin of a discretised logistic, PixelCNN++), so the ELBO and IWAE numbers
    are the probability of the image file and bits/dim compares with image-modelling papers. The default
    for colour photos: a Gaussian density on [0, 1] is not a probability of the 8-bit file, and Bernoulli
    logits treat colour intensities as coin flips (CIFAR-10's test "ELBO" of -1,860 nats meant nothing)."""

    discretised = True
    LEVELS = 256  # training data is 8-bit unless the dataset says otherwise (`levels`)

    def __init__(self, channels: int = 3) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.full((channels, 1, 1), -3.0))

    def nll(self, out: Tensor, x: Tensor, levels: int | None = None) -> Tensor:
        scale = self.log_scale.clamp(-7.0, 2.0)
        return losses.discretized_logistic_nll(self.mean(out), scale, x, levels or self.LEVELS)

    def mean(self, out: Tensor) -> Tensor:
        return torch.sigmoid(out.float())


LIKELIHOODS: Registry[type[nn.Module]] = Registry("likelihood", "model.likelihood")
LIKELIHOODS.add("bernoulli", Bernoulli)
LIKELIHOODS.add("gaussian", Gaussian)
LIKELIHOODS.add("logistic", Logistic)


def make_likelihood(name: str, shape: tuple[int, ...]) -> nn.Module:
    """The recipe's likelihood for images; a per-dimension Gaussian for vector inputs."""
    if len(shape) != 3:
        return Gaussian(shape[0], vector=True)
    cls = LIKELIHOODS.get(name)
    return cls(shape[0]) if cls is Logistic else cls()
