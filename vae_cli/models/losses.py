"""Loss math as pure functions over tensors. Each returns one value per example (sum over dimensions);
callers average over the batch. Everything is computed in float32 even under autocast, because sums over
hundreds of pixels and the KL lose too much in bf16/fp16.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from vae_cli.core import rng


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
    return mu + rng.randn_like(mu) * torch.exp(0.5 * logvar)


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


def discretized_logistic_logp(x: Tensor, mean: Tensor, log_scale: Tensor, levels: int) -> Tensor:
    """log P(x) element by element, for x on a grid of `levels` values in [0, 1], under a logistic of `mean`
    and scale exp(log_scale) integrated over each value's bin, the end bins reaching to -inf/+inf (Salimans,
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
    return torch.where(x <= half, log_cdf_plus, torch.where(x >= 1 - half, log_one_minus_cdf_minus, log_mid))


def discretized_logistic_nll(mean: Tensor, log_scale: Tensor, x: Tensor, levels: int) -> Tensor:
    """-log P(x) per example under one discretised logistic per pixel (`discretized_logistic_logp`)."""
    return -_flat_sum(discretized_logistic_logp(x, mean, log_scale, levels))


def coupled_means(means: Tensor, coeffs: Tensor, x: Tensor) -> Tensor:
    """PixelCNN++'s channel coupling (Salimans et al. 2017, section 2.2): the green mean moves with the red
    value, the blue mean with red and green, so one mixture component models a colour, not three independent
    channels. means (B, M, 3, H, W), coeffs (B, M, 3, H, W) in [-1, 1], x (B, 1, 3, H, W) or (B, M, 3, H, W)."""
    r, g = x[:, :, 0], x[:, :, 1]
    return torch.stack([means[:, :, 0], means[:, :, 1] + coeffs[:, :, 0] * r,
                        means[:, :, 2] + coeffs[:, :, 1] * r + coeffs[:, :, 2] * g], 2)


def log_bin_mass(x: Tensor, mean: Tensor, log_scale: Tensor, levels: int) -> Tensor:
    """log P(x) element by element under discretised logistics, as `discretized_logistic_logp`, in a form with
    no branch over the values: the end bins get edges at -/+1e6 (standing in for -/+inf), and the mass of a bin
    [lo, hi] is sigmoid(a) - sigmoid(b) = sigmoid(a) * sigmoid(-b) * (1 - exp(b - a)) with a, b its standardised
    edges, whose log is exact and stable in every regime (no fallback to the density needed). Three selects
    over (B, M, C, H, W) tensors, and their backward passes, were half of a hierarchical VAE's step on a CPU."""
    x = x.float()
    half = 0.5 / (levels - 1)
    hi = torch.where(x >= 1 - half, torch.full_like(x, 1e6), x + half)
    lo = torch.where(x <= half, torch.full_like(x, -1e6), x - half)
    inv = torch.exp(-log_scale.float())
    mean = mean.float()
    a, b = (hi - mean) * inv, (lo - mean) * inv
    return -F.softplus(-a) - F.softplus(b) + torch.log(-torch.expm1(-(hi - lo) * inv))


def discretized_mixture_nll(logit_pi: Tensor, means: Tensor, log_scales: Tensor, coeffs: Tensor | None,
                            x: Tensor, levels: int) -> Tensor:
    """-log P(x) per example under a mixture of M discretised logistics per pixel, its colour channels coupled
    (Salimans et al. 2017, "PixelCNN++", eq. 2-3; the output of VDVAE and NVAE): logit_pi (B, M, H, W), means
    and log_scales (B, M, C, H, W), coeffs (B, M, 3, H, W) for colour images (None for grey), x (B, C, H, W) in
    [0, 1]. The components share the pixel's mixture weight across its channels."""
    x = x.float()[:, None]
    means = means.float()
    if coeffs is not None:
        means = coupled_means(means, coeffs.float(), x)
    logp = log_bin_mass(x, means, log_scales, levels).sum(2)  # (B, M, H, W)
    logp = logp + torch.log_softmax(logit_pi.float(), 1)
    return -_flat_sum(torch.logsumexp(logp, 1))


def gaussian_kl_two(mu_q: Tensor, logvar_q: Tensor, mu_p: Tensor, logvar_p: Tensor) -> Tensor:
    """KL(N(mu_q, e^logvar_q) || N(mu_p, e^logvar_p)) in closed form, per example: the KL of one latent group of
    a hierarchical VAE against its learned top-down prior (Sonderby et al. 2016, "Ladder VAEs"; Child 2021,
    "Very deep VAEs", eq. 3)."""
    mu_q, logvar_q, mu_p, logvar_p = mu_q.float(), logvar_q.float(), mu_p.float(), logvar_p.float()
    return 0.5 * _flat_sum(logvar_p - logvar_q + (logvar_q.exp() + (mu_q - mu_p).pow(2)) * torch.exp(-logvar_p)
                           - 1.0)


def iwae_bound(log_w: Tensor) -> Tensor:
    """log (1/K) sum_k w_k for log-weights (B, K): the importance-weighted bound on log p(x) (Burda, Grosse
    & Salakhutdinov 2016, "Importance Weighted Autoencoders", eq. 8); K = 1 is the ELBO."""
    return torch.logsumexp(log_w.float(), dim=1) - math.log(log_w.shape[1])
