"""Decoder likelihoods p(x|z): what the decoder's output means and how to score an image under it."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vae_cli.core.registry import Registry
from vae_cli.models import losses


class Bernoulli(nn.Module):
    """Decoder output = per-pixel logits; images in [0, 1]. Logits keep BCE safe under autocast."""

    def nll(self, out: Tensor, x: Tensor, levels: int | None = None) -> Tensor:
        # Binary images are already discrete; on grey images this is the usual relaxation (`levels` unused).
        return losses.bernoulli_nll(out, x)

    def mean(self, out: Tensor) -> Tensor:
        return torch.sigmoid(out.float())


class Gaussian(nn.Module):
    """Decoder output = per-pixel mean through a sigmoid (images in [0, 1]); one learned log standard
    deviation. With `vector=True` (M1+M2's latent codes): identity mean and one scale per dimension."""

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


LIKELIHOODS: Registry[type[nn.Module]] = Registry("likelihood", "model.likelihood")
LIKELIHOODS.add("bernoulli", Bernoulli)
LIKELIHOODS.add("gaussian", Gaussian)


def make_likelihood(name: str, shape: tuple[int, ...]) -> nn.Module:
    """The recipe's likelihood for images; a per-dimension Gaussian for vector inputs."""
    return LIKELIHOODS.get(name)() if len(shape) == 3 else Gaussian(shape[0], vector=True)
