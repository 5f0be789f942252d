"""Decoder likelihoods p(x|z): what the decoder's output means and how to score an image under it."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vae_cli import losses


class Bernoulli(nn.Module):
    """Decoder output = per-pixel logits; images in [0, 1]. Logits keep BCE safe under autocast."""

    def nll(self, out: Tensor, x: Tensor) -> Tensor:
        return losses.bernoulli_nll(out, x)

    def mean(self, out: Tensor) -> Tensor:
        return torch.sigmoid(out.float())


class Gaussian(nn.Module):
    """Decoder output = per-pixel mean through a sigmoid; one learned log standard deviation."""

    def __init__(self) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.full((1,), -2.0))

    def nll(self, out: Tensor, x: Tensor) -> Tensor:
        return losses.gaussian_nll(torch.sigmoid(out.float()), self.log_scale.clamp(-7.0, 2.0), x)

    def mean(self, out: Tensor) -> Tensor:
        return torch.sigmoid(out.float())


LIKELIHOODS: dict[str, type[nn.Module]] = {"bernoulli": Bernoulli, "gaussian": Gaussian}
