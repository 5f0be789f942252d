"""The Gaussian-latent VAE (Kingma & Welling 2014, "Auto-Encoding Variational Bayes") with the "M1"
classifier of Kingma, Rezende, Mohamed & Welling 2014 ("Semi-supervised learning with deep generative
models", section 3.1): the VAE is trained without labels, then a small classifier is fitted on the
latent means of the labelled images and stored in the same weights file.

The classifier sees standardised latent means during `predict_proba`, and posterior samples
z ~ q(z|x) while it is fitted: a free, model-given data augmentation that helps when labels are few.
Per-class Gaussians over the latent means give class-conditional sampling (`vae sample --class C`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vae_cli.core import rng
from vae_cli.core.pool import map_batches
from vae_cli.models import losses
from vae_cli.models.base import Model
from vae_cli.models.likelihoods import decoder_channels, make_likelihood
from vae_cli.models.nets import fp32, make_decoder, make_encoder, mlp
from vae_cli.models.registry import register


class ClassCodes:
    """Class-conditional sampling through the latent code: one Gaussian per class over the codes of that class's
    labelled images (their posterior means, spread by the means' variance plus the mean posterior variance),
    fitted after training; a sample of class c decodes a code drawn from class c's Gaussian. The ex-post density
    estimate of Ghosh et al. 2020 ("From variational to deterministic autoencoders", section 4), one component
    per class. A decoder that is told the class can still ignore it (a hierarchical M2's does: its samples
    were classified at chance); the codes of real images of the class cannot. The buffers travel in the weights
    file."""

    def _init_class_codes(self, k: int, num_classes: int) -> None:
        self.register_buffer("class_mu", torch.zeros(num_classes, k))
        self.register_buffer("class_logvar", torch.zeros(num_classes, k))

    def fit_class_codes(self, mu: Tensor, logvar: Tensor, y: Tensor) -> None:
        with torch.no_grad():
            for c in range(self.num_classes):
                sel = mu[y == c]
                if len(sel):
                    self.class_mu[c] = sel.mean(0)
                    spread = sel.var(0, unbiased=False) + logvar[y == c].exp().mean(0)
                    self.class_logvar[c] = spread.clamp_min(1e-6).log()

    def class_codes(self, y: Tensor, temperature: float) -> Tensor:
        """Codes drawn from each class's Gaussian over the latent means, fitted on the labelled images."""
        eps = rng.randn(len(y), self.class_mu.shape[1], device=self.class_mu.device) * temperature
        return self.class_mu[y] + eps * torch.exp(0.5 * self.class_logvar[y])


class M1Head(ClassCodes):
    """The M1 classifier (Kingma et al. 2014, section 3.1) over a model's `latent_posterior`: per-class
    Gaussians over the latent means (class-conditional sampling, `ClassCodes`) and a small head fitted on
    posterior draws of the labelled images after training. Mixed into unsupervised models; the buffers travel in
    the weights file."""

    fits_head = True  # train.head_steps

    def _init_m1(self, k: int, num_classes: int, head_hidden: int, dropout: float) -> None:
        self.head = mlp(k, head_hidden, num_classes, dropout=dropout)
        self.register_buffer("feat_mean", torch.zeros(k))
        self.register_buffer("feat_std", torch.ones(k))
        self._init_class_codes(k, num_classes)

    def _features(self, z: Tensor) -> Tensor:
        return (z - self.feat_mean) / self.feat_std

    def fit_classifier(self, x, y, steps, batch_size):
        with torch.no_grad():
            self.eval()
            mu, logvar = zip(*map_batches(self.latent_posterior, x.split(1024), x.device))
        return self.fit_head(torch.cat(mu).float(), torch.cat(logvar).float(), y, steps, batch_size)

    def fit_head(self, mu: Tensor, logvar: Tensor, y: Tensor, steps: int, batch_size: int) -> dict[str, float]:
        """The head and class codes from the labelled images' `latent_posterior` (mu, logvar), measured already."""
        with torch.no_grad():
            self.feat_mean.copy_(mu.mean(0))
            self.feat_std.copy_(mu.std(0).clamp_min(1e-3) if len(mu) > 1 else torch.ones_like(mu[0]))
            self.fit_class_codes(mu, logvar, y)
        if steps == 0:
            return {}
        opt = torch.optim.AdamW(self.head.parameters(), lr=3e-3, weight_decay=1e-3)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        self.head.train()
        n, total = len(mu), 0.0
        for step in range(steps):
            idx = rng.randint(0, n, (min(batch_size, n),), device=mu.device)
            z = losses.reparameterize(mu[idx], logvar[idx])
            loss = F.cross_entropy(self.head(self._features(z)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total = loss.item() if step == steps - 1 else total
        self.eval()
        return {"head_loss": total}

    def predict_logits(self, x):
        return self.head(self._features(self.latent_means(x).float())).float()



@register("vae")
class VAE(M1Head, Model):
    """Convolutional Gaussian-latent VAE (Kingma & Welling 2014) with an M1 latent classifier."""

    needs_labelled_batch = False  # unsupervised; labels are used after the loop, by fit_classifier
    # model.hidden sizes the backbones only: it is read when the chosen encoder or decoder has a hidden layer
    via_backbone = ("hidden",)
    reads = ("backbone", "decoder", "latent_dim", "width", "hidden", "likelihood", "mixtures", "beta",
             "head_hidden", "dropout", "test_flip")

    def __init__(self, cfg, image_shape, num_classes):
        super().__init__(cfg, image_shape, num_classes)
        k = cfg.latent_dim
        self.encoder = make_encoder(image_shape, cfg)
        self.to_latent = nn.Linear(self.encoder.out_dim, 2 * k)  # -> (mu, logvar)
        self.decoder = make_decoder(image_shape, cfg, k, decoder_channels(cfg, image_shape))
        self.likelihood = make_likelihood(cfg, self.image_shape)
        self._init_m1(k, num_classes, cfg.head_hidden, cfg.dropout)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mu, logvar = fp32(self.to_latent, self.encoder(x)).chunk(2, dim=1)
        return mu, logvar.clamp(-12.0, 8.0)  # keeps exp() finite early in training and under bf16

    def loss(self, batch, kl_weight):
        x = batch.x
        mu, logvar = self.encode(x)
        out = self.decoder(losses.reparameterize(mu, logvar))
        return losses.elbo_terms(self.likelihood.nll(out, x), losses.gaussian_kl(mu, logvar),
                                 kl_weight * self.cfg.beta)

    def elbo_parts(self, x):
        mu, logvar = self.encode(x)
        out = self.decoder(losses.reparameterize(mu, logvar))
        return {"recon": self.likelihood.nll(out, x), "kl": losses.gaussian_kl(mu, logvar)}

    def log_weight_parts(self, x: Tensor, k: int, levels: int | None = None) -> tuple[Tensor, Tensor]:
        """(B, k) each: -log p(x|z) and log q(z|x) - log p(z) for k draws z ~ q(z|x)."""
        mu, logvar = self.encode(x)
        b = x.shape[0]
        mu_k, logvar_k = mu.repeat_interleave(k, 0), logvar.repeat_interleave(k, 0)
        z = losses.reparameterize(mu_k, logvar_k)
        nll = self.likelihood.nll(self.decoder(z), x.repeat_interleave(k, 0), levels)
        zeros = torch.zeros_like(z)
        log_ratio = losses.gaussian_log_density(z, mu_k, logvar_k) - losses.gaussian_log_density(z, zeros, zeros)
        return nll.view(b, k), log_ratio.view(b, k)

    def log_weights(self, x, k, levels=None):
        nll, log_ratio = self.log_weight_parts(x, k, levels)
        return -nll - log_ratio

    def latent_means(self, x):
        return self.encode(x)[0]

    def latent_posterior(self, x):
        return self.encode(x)

    def decode_latents(self, z, y=None):
        return self.likelihood.mean(self.decoder(z))

    # --- generation ---------------------------------------------------------------------------------
    def sample(self, n, y=None, temperature=1.0):
        if y is None:
            z = rng.randn(n, self.cfg.latent_dim, device=self.device) * temperature
        else:  # the class's Gaussian over latent means, fitted on the labelled images
            z = self.class_codes(y, temperature)
        return self.likelihood.mean(self.decoder(z))

    def reconstruct(self, x):
        mu, _ = self.encode(x)
        return self.likelihood.mean(self.decoder(mu))


@register("iwae")
class IWAE(VAE):
    """The VAE trained on the k-sample importance-weighted bound (Burda, Grosse & Salakhutdinov 2016)."""

    reads = (*VAE.reads, "iw_samples")

    def loss(self, batch, kl_weight):
        # KL warm-up weights the prior/posterior ratio inside every weight (an annealed bound)
        nll, log_ratio = self.log_weight_parts(batch.x, self.cfg.iw_samples)
        bound = losses.iwae_bound(-nll - kl_weight * self.cfg.beta * log_ratio)
        return {"loss": -bound.mean(), "recon": nll.mean(), "kl": log_ratio.mean()}
