"""M2 with a hierarchical decoder: the classifier q(y|x) and every term of `m2` (labelled ELBO, cross-entropy,
consistency, alignment, rotation and colour tasks), with p(x|y,z) the ladder of `hvae` conditioned on the class
at the top of its top-down path, so the model that classifies also reconstructs and generates photos.

M2's unlabelled bound (Kingma et al. 2014, eq. 7) decodes every unlabelled image once per class: with a real
decoder that is K times the decoder's cost, which is why the `m2` photo recipes use an MLP decoder. Here an
unlabelled image is decoded once, under its soft prediction q(y|x) as the class weights, and the bound reads

    -U~(x) = -E_q(z|x,q)[log p(x | q(y|x), z)] + KL(q(z|x,q) || p(z|q)) + KL(q(y|x) || p(y))

the smooth ELBO of SHOT-VAE (Feng, Kong, Chen, Zhang, Zhu & Chen, AAAI 2021, "SHOT-VAE: semi-supervised deep
generative models with label-aware ELBO approximations", 6.11% on CIFAR-10 with 4,000 labels): the expectation
over y moved inside the decoder. It is not a bound on M2's mixture likelihood, so evaluation keeps the exact
one (eq. 7), estimated the way its z part already is, by a draw: `elbo_parts` draws y ~ q(y|x) (one ladder pass,
not K), `log_weights` draws y beside z (an IWAE bound on log p(x) = log sum_y p(y) p(x|y)), and bits/dim mean
what they mean for `m2` and `hvae`.

The ladder has its own bottom-up path (`model.decoder_width` channels); q(y|x) keeps the recipe's `backbone`
trunk, so the classifier's cost is M2's and the generative part adds one ladder pass per image of a bound.
`model.ladder_images` caps those per step, labelled and unlabelled each, apart from the images the classifier
side sees (`model.unlabelled_elbo_images`: the trunk's pass with gradients and the self-supervised tasks). With
one key for both, m2h's recipe had to choose between M2's classifier training and an affordable ladder: at 16
unlabelled images its self-supervised tasks saw 80 images a step where `m2`'s see 128, and its test accuracy fell
behind m2's at equal epochs (session 21). With the two apart it kept up, and in the same 55 minutes it ended
0.24 points ahead (BENCHMARKS.md, session 22).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from vae_cli.core import rng
from vae_cli.core.pool import map_batches
from vae_cli.models.hvae import HVAE, top_level_ratio
from vae_cli.models.m2 import M2, per_step_count
from vae_cli.models.nets import one_hot
from vae_cli.models.ppca import CodeDensity
from vae_cli.models.registry import register
from vae_cli.models.vae import ClassCodes

LADDER_KEYS = ("decoder_width", "latent_channels", "depth", "latent_levels")


@register("m2h")
class M2H(ClassCodes, CodeDensity, M2):
    """M2 whose p(x|y,z) is a hierarchical VAE's ladder, trained on SHOT-VAE's smooth ELBO (one decoder pass).
    Class-conditional samples start from codes of the class (`ClassCodes` over the ladder's coarsest groups,
    fitted on the labelled images after training): the ladder, told the class at its top, learns to ignore it
    (its samples of a class were classified at chance, BENCHMARKS.md session 16)."""

    reads = (*(k for k in M2.reads if k not in ("decoder", "latent_dim")), *LADDER_KEYS, "ladder_images")

    def _init_generator(self, cfg) -> None:
        if len(self.input_shape) != 3:
            raise ValueError("m2h models images (C, H, W), not vectors")
        ladder_cfg = dataclasses.replace(cfg, width=cfg.decoder_width or cfg.width)
        self.gen = HVAE(ladder_cfg, self.input_shape, self.num_classes, conditional=True)
        self._init_class_codes(self.gen.code_dim, self.num_classes)
        self._init_code_density(self.gen.codes_dim, self.num_classes)

    def fit_classifier(self, x: Tensor, y: Tensor, steps: int, batch_size: int) -> dict[str, float]:
        """After training, for class-conditional sampling: each class's PPCA over every group's codes of its
        labelled images, given their class (`CodeDensity`), and its Gaussian over the coarsest codes
        (`ClassCodes`: interpolation and embeddings). q(y|x) is trained with the model: `steps` is unused."""
        with torch.no_grad():
            self.eval()
            # one ladder pass: the coarsest codes are the first `code_dim` of every group's
            parts = map_batches(lambda b: self.gen.all_codes(b[0], self._y(b[1])), zip(x.split(512), y.split(512)),
                                x.device)  # on all the cores, the same bits
            mean, logvar = torch.cat([m for m, _ in parts]), torch.cat([v for _, v in parts])
            d = self.gen.code_dim
            self.fit_class_codes(mean[:, :d], logvar[:, :d], y)
            self.fit_code_density(mean, y, logvar)
        return {}

    @property
    def latent_size(self) -> int:
        return self.gen.code_dim

    def _y(self, y: Tensor) -> Tensor:
        """Class weights (B, K) from indices or weights."""
        return y.float() if y.ndim == 2 else one_hot(y, self.num_classes)

    # --- the bounds -------------------------------------------------------------------------------------
    def neg_elbo(self, x: Tensor, h: Tensor, y: Tensor, kl_weight: float = 1.0) -> dict[str, Tensor]:
        """-L(x, y) per image (eq. 6), y as indices or class weights; p(y) uniform. `h` (the trunk's features)
        is unused: the ladder has its own bottom-up path."""
        recon, kl = self.gen.neg_elbo_parts(x, self._y(y))
        return {"value": recon + kl_weight * self.cfg.beta * kl + math.log(self.num_classes), "recon": recon,
                "kl": kl}

    def labelled_bound(self, x, h, y, kl_weight, share=1.0):
        """-L(x, y) (eq. 6) on the first `model.ladder_images` labelled images: the labelled draw is random, so
        they are a random subset. The bound trains only the ladder (the classifier learns from the labels'
        cross-entropy on every labelled image), so the cap trades ladder updates for the step's time."""
        m = per_step_count(self.cfg.ladder_images, share, len(x))
        return self.neg_elbo(x[:m], h, y[:m], kl_weight)["value"].mean()

    def unlabelled_bound(self, x, h, q, kl_weight, share=1.0):
        """SHOT-VAE's smooth ELBO: one decoder pass under q(y|x), plus KL(q(y|x) || uniform), on the first
        `model.ladder_images` of the step's `model.unlabelled_elbo_images` (which the trunk, q(y|x) and the
        self-supervised tasks see in full, as in `m2`)."""
        m = per_step_count(self.cfg.ladder_images, share, len(x))
        x, q = x[:m], q[:m]
        out = self.neg_elbo(x, h, q, kl_weight)
        neg_entropy = (q.float() * torch.log(q.float().clamp_min(1e-12))).sum(1)
        return out["value"] + neg_entropy, out["recon"].mean(), out["kl"].mean()

    def elbo_parts(self, x: Tensor) -> dict[str, Tensor]:
        """M2's unlabelled bound (eq. 7) with y drawn from q(y|x) instead of enumerated: E_q(y|x)[-L(x, y)] is
        estimated by one draw, as its z part already is, so the estimate is unbiased and costs one ladder pass
        per image where the enumeration cost K (the per-epoch test numbers of the CIFAR-10 recipe took 85 s of
        every fifth epoch, and a 100-class set would cost 100 passes). KL includes KL(q(y|x) || p(y))."""
        K = self.num_classes
        q = F.softmax(self.class_logits(self.trunk(x)).float(), 1)
        y = rng.multinomial(q, 1)[:, 0]
        recon, kl_z = self.gen.neg_elbo_parts(x, one_hot(y, K))
        kl_y = (q * torch.log(q.clamp_min(1e-12))).sum(1) + math.log(K)
        return {"recon": recon, "kl": kl_z + kl_y}

    def log_weights(self, x, k, levels=None, prior_from: int | None = None):
        """Latents (y, z) drawn as y ~ q(y|x), z ~ q(z|x,y) through the ladder; p(y) uniform. `prior_from`: the
        ladder's groups from this index on drawn from their prior (`level_ratio`)."""
        b, K = len(x), self.num_classes
        log_q = F.log_softmax(self.class_logits(self.trunk(x)), 1)
        y = rng.multinomial(log_q.exp(), k, replacement=True).flatten()  # (B*k), image-major
        log_qy = log_q.repeat_interleave(k, 0).gather(1, y[:, None])[:, 0]
        log_w = self.gen.log_weights(x, k, levels, prior_from=prior_from, y=one_hot(y, K)).flatten() \
            - math.log(K) - log_qy
        return log_w.view(b, k)

    @property
    def has_hierarchy(self) -> bool:
        return self.gen.has_hierarchy

    def level_ratio(self, x, k, full=None):
        """The `hvae` ratio (Havtorn et al. 2021) of the ladder, y drawn from q(y|x) in both bounds."""
        return top_level_ratio(self.log_weights, self.gen.finest_group, x, k, full) if self.has_hierarchy else None

    # --- codes and pictures -----------------------------------------------------------------------------
    def _predicted(self, x: Tensor) -> Tensor:
        return one_hot(self.class_logits(self.trunk(x)).argmax(1), self.num_classes)

    def latent_posterior(self, x):
        """The ladder's coarsest groups under the predicted class."""
        return self.gen.latent_posterior(x, self._predicted(x))

    def decode_latents(self, z, y=None):
        y = torch.zeros(len(z), dtype=torch.long, device=z.device) if y is None else y
        params, _ = self.gen.top_down(len(z), None, "prior", 0.0, top_codes=z, y=self._y(y))
        return self.gen.likelihood.mean(params)

    def sample(self, n, y=None, temperature=1.0):
        """n images; y (indices): their classes, every group's code from the class's PPCA (`CodeDensity`; a file
        from before it: the coarsest from `ClassCodes`, finer groups from the ladder's prior)."""
        if y is None:
            y = torch.arange(n, device=self.device) % self.num_classes
        codes = self.draw_class_codes(y, temperature) if self.has_code_density else self.class_codes(y, temperature)
        return self.gen.draw(n, temperature, top_codes=codes, y=self._y(y))

    def reconstruct(self, x):
        return self.gen.reconstruct(x, self._predicted(x))
