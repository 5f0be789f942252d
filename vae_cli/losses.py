"""Loss math as pure functions over tensors. Each returns one value per example (sum over dimensions);
callers average over the batch. Everything is computed in float32 even under autocast, because sums over
hundreds of pixels and the KL lose too much in bf16/fp16.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def _flat_sum(t: Tensor) -> Tensor:
    return t.flatten(1).sum(1)


def gaussian_kl(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) in closed form, per example.

    Kingma & Welling 2014, "Auto-Encoding Variational Bayes", appendix B:
    -KL = 1/2 * sum(1 + log sigma^2 - mu^2 - sigma^2).
    """
    mu, logvar = mu.float(), logvar.float()
    return 0.5 * _flat_sum(mu.pow(2) + logvar.exp() - 1.0 - logvar)


def bernoulli_nll(logits: Tensor, x: Tensor) -> Tensor:
    """-log p(x|z) for a Bernoulli decoder given logits, per example (x in [0,1]).

    Uses the fused, numerically stable BCE-with-logits; for non-binary x this is the usual
    continuous relaxation (Kingma & Welling 2014, section 5).
    """
    return _flat_sum(F.binary_cross_entropy_with_logits(logits.float(), x.float(), reduction="none"))


def gaussian_nll(mean: Tensor, log_scale: Tensor, x: Tensor) -> Tensor:
    """-log N(x; mean, exp(log_scale)^2), per example (log_scale broadcast over pixels)."""
    mean, log_scale, x = mean.float(), log_scale.float(), x.float()
    z = (x - mean) * torch.exp(-log_scale)
    return _flat_sum(0.5 * z.pow(2) + log_scale + 0.5 * math.log(2 * math.pi))


def reparameterize(mu: Tensor, logvar: Tensor) -> Tensor:
    """z = mu + sigma * eps, eps ~ N(0, I): the reparameterisation trick (Kingma & Welling 2014, 2.4)."""
    return mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)


def elbo_terms(recon_nll: Tensor, kl: Tensor, kl_weight: float = 1.0) -> dict[str, Tensor]:
    """Batch-mean loss terms of the (beta-weighted) negative ELBO, in nats per image."""
    recon, kl_mean = recon_nll.mean(), kl.mean()
    return {"loss": recon + kl_weight * kl_mean, "recon": recon, "kl": kl_mean}
