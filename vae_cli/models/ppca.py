"""Class-conditional sampling from a ladder: one probabilistic-PCA Gaussian per class over the posterior means of
every latent group, fitted after training (an ex-post density, Ghosh et al. 2020, "From variational to
deterministic autoencoders", section 4; the two-stage idea of Dai & Wipf 2019).

Why every group and why PPCA: on CIFAR-10 the objects live in the 16x16 latents (BENCHMARKS.md, session 19). The
ladder's diagonal prior there draws textures whatever the coarse codes say, so codes of the class at the 4x4
groups only (`ClassCodes`) gave samples its own classifier named at 13-16%. A Gaussian per class over all groups
with a diagonal covariance draws every latent position on its own: 16%. With a covariance of low rank, the
class's main directions of variation move the positions together, as real codes do: 49-59% for ranks 16-256
(session 23). The rank is capped (`RANK`): the class's top directions hold its shapes, the rest is estimated
from a few hundred codes in thousands of dimensions and added noise (rank 256: 49%).

The model (Tipping & Bishop 1999, "Probabilistic principal component analysis", section 3.2): c ~ N(mu, W W^T +
s2 I), fitted in closed form by maximum likelihood: mu the mean, W = U_r (L_r - s2)^(1/2) from the top r
eigenpairs (U_r, L_r) of the sample covariance, s2 the mean of the discarded eigenvalues.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vae_cli.core import rng

RANK = 32  # directions per class (fewer where a class has fewer labelled images); stored as float16


OVERSAMPLE, POWER_STEPS = 32, 4  # of the randomised range finder (Halko et al.'s defaults: 5-10 and 1-2, raised)


def top_eigen(xc: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """(the top r eigenvalues of the sample covariance xc^T xc / N, largest first; their eigenvectors as rows
    (r, D)) of centred rows xc (N, D). A matrix wider than twice the sketch takes the randomised SVD of Halko,
    Martinsson & Tropp 2011 (algorithm 4.4, power iterations with re-orthonormalisation): an exact float64 SVD
    of 4,750 codes of 5,376 numbers (one CIFAR-10 class, every label) took 30 s, and r = 32 directions of it are
    all the fit keeps. Its test matrix comes from a fixed seed, so the fit is reproducible and leaves torch's
    global random state alone."""
    n, d = xc.shape
    q = r + OVERSAMPLE
    if min(n, d) <= 2 * q:
        _, s, vh = torch.linalg.svd(xc, full_matrices=False)
        return s[:r] ** 2 / n, vh[:r]
    omega = torch.randn(d, q, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    basis, _ = torch.linalg.qr(xc @ omega.to(xc.device, xc.dtype))  # (N, q): spans xc's top range
    for _ in range(POWER_STEPS):  # each step sharpens the gap between kept and dropped directions
        basis, _ = torch.linalg.qr(xc.T @ basis)
        basis, _ = torch.linalg.qr(xc @ basis)
    _, s, vh = torch.linalg.svd(basis.T @ xc, full_matrices=False)  # (q, D): small
    return s[:r] ** 2 / n, vh[:r]


def ppca_fit(x: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """(mean (D,), W (r, D), s2 ()) of the maximum-likelihood PPCA of the rows of x (N, D), r = min(rank, N - 1);
    W's rows are the scaled principal directions."""
    x = x.double()
    n, d = x.shape
    mean = x.mean(0)
    r = max(0, min(rank, n - 1, d))
    if r == 0:
        return mean.float(), x.new_zeros(0, d).float(), x.new_zeros(()).float()
    xc = x - mean
    lam, vh = top_eigen(xc, r)
    # s2 is the mean of the discarded eigenvalues: the total variance (the trace) less the kept ones
    s2 = ((xc.square().sum() / n - lam.sum()) / (d - r)).clamp_min(0) if d > r else lam.new_zeros(())
    w = vh * (lam - s2).clamp_min(0).sqrt()[:, None]
    return mean.float(), w.float(), s2.float()


def ppca_draw(mean: Tensor, w: Tensor, s2: Tensor, temperature: float) -> Tensor:
    """Rows drawn from N(mean, W^T W + s2 I) (one per row of mean (B, D), w (B, r, D), s2 (B,)), the noise
    scaled by `temperature`."""
    b, r, d = w.shape
    eps = rng.randn(b, r, device=mean.device)
    noise = rng.randn(b, d, device=mean.device)
    return mean + temperature * (torch.einsum("br,brd->bd", eps, w.float()) + s2.sqrt()[:, None] * noise)


class CodeDensity:
    """Per-class PPCA over a ladder's codes (`codes_dim` numbers: every group's posterior mean), in buffers
    that travel in the weights file. A file from before them loads with them unfitted (`has_code_density`
    False), and its samples come from the older class codes."""

    optional_buffers = ("code_mean", "code_basis", "code_noise")

    def _init_code_density(self, codes_dim: int, num_classes: int) -> None:
        self.register_buffer("code_mean", torch.zeros(num_classes, codes_dim))
        self.register_buffer("code_basis", torch.zeros(num_classes, RANK, codes_dim, dtype=torch.float16))
        self.register_buffer("code_noise", torch.zeros(num_classes))  # s2 per class; 0: not fitted

    @property
    def has_code_density(self) -> bool:
        return bool((self.code_noise > 0).all())

    def fit_code_density(self, codes: Tensor, y: Tensor, posterior_logvar: Tensor) -> None:
        """Each class's PPCA over its images' codes. `posterior_logvar` (N, D): where a class has too few images
        for any direction or spread (one image), its noise is their mean posterior variance, so its samples
        are not copies of its codes."""
        with torch.no_grad():
            self.code_basis.zero_()
            for c in range(len(self.code_mean)):
                sel = codes[y == c].float()
                if not len(sel):
                    continue
                mean, w, s2 = ppca_fit(sel, self.code_basis.shape[1])
                self.code_mean[c] = mean
                self.code_basis[c, :len(w)] = w.to(self.code_basis.dtype)
                floor = posterior_logvar[y == c].float().exp().mean() if len(w) == 0 else torch.tensor(1e-8)
                self.code_noise[c] = torch.maximum(s2, floor).clamp_min(1e-8)

    def draw_class_codes(self, y: Tensor, temperature: float) -> Tensor:
        """(n, codes_dim) codes drawn from the PPCA of each row's class."""
        return ppca_draw(self.code_mean[y], self.code_basis[y], self.code_noise[y], temperature)
