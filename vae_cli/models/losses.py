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


def gaussian_log_density(z: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """log N(z; mu, exp(logvar)) summed over dimensions, per example (mu = 0, logvar = 0: the prior)."""
    z, mu, logvar = z.float(), mu.float(), logvar.float()
    return -0.5 * _flat_sum((z - mu).pow(2) * torch.exp(-logvar) + logvar + math.log(2 * math.pi))


def discretized_gaussian_nll(mean: Tensor, log_scale: Tensor, x: Tensor, levels: int) -> Tensor:
    """-log P(x) for x on a grid of `levels` values in [0, 1] (0, 1/(L-1), ..., 1), per example: the
    Gaussian's mass over each value's bin, the end bins reaching to -inf/+inf, so the masses sum to one
    (the discretisation of Salimans et al. 2017, "PixelCNN++", section 2.1, with a Gaussian)."""
    mean, log_scale, x = mean.float(), log_scale.float(), x.float()
    half = 0.5 / (levels - 1)
    inv = torch.exp(-log_scale) / math.sqrt(2.0)
    upper = torch.where(x >= 1 - half, torch.ones_like(x), 0.5 * (1 + torch.erf((x + half - mean) * inv)))
    lower = torch.where(x <= half, torch.zeros_like(x), 0.5 * (1 + torch.erf((x - half - mean) * inv)))
    mass = (upper - lower).clamp_min(1e-12)
    return -_flat_sum(torch.log(mass))


def discretized_logistic_nll(mean: Tensor, log_scale: Tensor, x: Tensor, levels: int) -> Tensor:
    """-log P(x) for x on a grid of `levels` values in [0, 1], per example, under a logistic of `mean` and
    scale exp(log_scale) integrated over each value's bin, the end bins reaching to -inf/+inf (Salimans,
    Karpathy, Chen & Kingma 2017, "PixelCNN++", section 2.1; the likelihood of NVAE and VDVAE). Computed in
    log space (softplus forms of log sigmoid); a bin whose mass underflows falls back to the density at its
    centre times the bin width, as in PixelCNN++'s reference code."""
    mean, log_scale, x = mean.float(), log_scale.float(), x.float()
    half = 0.5 / (levels - 1)
    inv = torch.exp(-log_scale)
    centred = x - mean
    plus, minus = (centred + half) * inv, (centred - half) * inv
    log_cdf_plus = plus - F.softplus(plus)  # log sigmoid(plus): the lowest bin's mass
    log_one_minus_cdf_minus = -F.softplus(minus)  # log (1 - sigmoid(minus)): the highest bin's mass
    mass = torch.sigmoid(plus) - torch.sigmoid(minus)
    mid = centred * inv
    log_pdf_mid = mid - log_scale - 2.0 * F.softplus(mid)
    log_mid = torch.where(mass > 1e-5, torch.log(mass.clamp_min(1e-12)), log_pdf_mid + math.log(2 * half))
    log_p = torch.where(x <= half, log_cdf_plus, torch.where(x >= 1 - half, log_one_minus_cdf_minus, log_mid))
    return -_flat_sum(log_p)


def iwae_bound(log_w: Tensor) -> Tensor:
    """log (1/K) sum_k w_k for log-weights (B, K): the importance-weighted bound on log p(x) (Burda, Grosse
    & Salakhutdinov 2016, "Importance Weighted Autoencoders", eq. 8); K = 1 is the ELBO."""
    return torch.logsumexp(log_w.float(), dim=1) - math.log(log_w.shape[1])
