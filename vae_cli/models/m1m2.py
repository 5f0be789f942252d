"""M1+M2 (Kingma, Rezende, Mohamed & Welling 2014, section 3.1.3): M2 trained on the latent space of a
first VAE (M1). Here both are trained in one loop: M1 on the images, M2 on samples z1 ~ q(z1|x) with the
gradient stopped between them, which is the paper's two-stage scheme with M1 still improving while M2
learns. Classification uses M2's q(y|z1) on M1's latent means; samples are drawn by M2 in latent space
and decoded by M1 (class-conditional with `--class`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from vae_cli.models import losses
from vae_cli.models.base import Batch, Model
from vae_cli.models.m2 import M2
from vae_cli.models.registry import register
from vae_cli.models.vae import VAE


@register("m1m2")
class M1M2(Model):
    """M2 on the latent codes of a VAE (M1), the paper's stacked model (Kingma et al. 2014)."""

    reads = tuple(dict.fromkeys((*VAE.reads, *M2.reads)))  # both halves read the one model section

    def __init__(self, cfg, image_shape, num_classes):
        super().__init__(cfg, image_shape, num_classes)
        self.m1 = VAE(cfg, image_shape, num_classes)
        self.m2 = M2(cfg, image_shape, num_classes, input_shape=(cfg.latent_dim,))

    def _codes(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            return losses.reparameterize(*self.m1.encode(x))

    def loss(self, batch: Batch, kl_weight: float) -> dict[str, Tensor]:
        t1 = self.m1.loss(batch, kl_weight)
        coded = Batch(self._codes(batch.x), batch.y, batch.labelled, self._codes(batch.x_lab), batch.y_lab,
                      batch.strong)
        t2 = self.m2.loss(coded, kl_weight)
        return {"loss": t1["loss"] + t2["loss"], "recon": t1["recon"], "kl": t1["kl"],
                "m2_loss": t2["loss"], "class_loss": t2["class_loss"]}

    def predict_logits(self, x: Tensor) -> Tensor:
        return self.m2.predict_logits(self.m1.encode(x)[0])

    def elbo_parts(self, x: Tensor) -> dict[str, Tensor]:
        return self.m1.elbo_parts(x)

    def log_weights(self, x: Tensor, k: int, levels: int | None = None) -> Tensor:
        return self.m1.log_weights(x, k, levels)  # the image model is M1 (its N(0, I) prior)

    def latent_means(self, x: Tensor) -> Tensor:
        return self.m1.latent_means(x)

    def latent_posterior(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.m1.encode(x)

    def decode_latents(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        return self.m1.decode_latents(z)

    def sample(self, n: int, y: Tensor | None = None, temperature: float = 1.0) -> Tensor:
        z1 = self.m2.sample(n, y, temperature)
        return self.m1.likelihood.mean(self.m1.decoder(z1))

    def reconstruct(self, x: Tensor) -> Tensor:
        return self.m1.reconstruct(x)
