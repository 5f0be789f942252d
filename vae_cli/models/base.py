"""What every model offers the training loop and the commands. Subclasses add only what differs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from vae_cli.data.augment import strong as strong_view


@dataclass
class Batch:
    """One optimisation step's data. `x`/`y` is a slice of the whole training set (`labelled` marks
    which of its labels may be used); `x_lab`/`y_lab` is a separate draw from the labelled subset, so
    models that need labels see some every step even when 100 of 60,000 images carry one."""

    x: Tensor
    y: Tensor
    labelled: Tensor
    x_lab: Tensor
    y_lab: Tensor
    # The strong view for consistency terms; the training loop passes one that follows the recipe's
    # augmentation keys (train.augment_flip). Standalone batches get the default strong view.
    strong: Callable[[Tensor], Tensor] = field(default=strong_view)
    # The fraction of the step's batch this is (1/n for one of n shards, engine/shards.py): a per-step count
    # such as model.unlabelled_elbo_images is taken in proportion, so sharding does not multiply it.
    share: float = 1.0


class Model(nn.Module):
    registry_name = "?"
    # Whether loss() reads batch.x_lab/y_lab; the loop skips drawing (and augmenting) them otherwise.
    needs_labelled_batch = True
    # Whether predict_logits is a classifier, and whether sample(n, y) draws images of class y: what
    # `recon_accuracy` and `sample_accuracy` (evaluation/evaluate.py) need; a model without says False.
    has_classifier = True
    class_conditional = True
    # The `model.*` recipe keys this model reads (besides `name`); a recipe that sets another one to a value
    # other than its default is refused (core/recipe.py), never silently ignored. `vae info --models` lists them.
    reads: tuple[str, ...] = ()
    # Whether fit_classifier trains a classifier for `train.head_steps` steps after the loop (the M1 head);
    # a recipe that sets train.head_steps for a model without one is refused.
    fits_head = False

    def __init__(self, cfg, image_shape: tuple[int, int, int], num_classes: int):
        super().__init__()
        self.cfg = cfg
        self.image_shape = tuple(image_shape)
        self.num_classes = num_classes

    # --- training ---------------------------------------------------------------------------------
    def loss(self, batch: Batch, kl_weight: float) -> dict[str, Tensor]:
        """Batch-mean loss terms; `loss` is minimised."""
        raise NotImplementedError

    def forward(self, batch: Batch, kl_weight: float) -> dict[str, Tensor]:
        """The training loss, as `forward` so DistributedDataParallel can wrap the model."""
        return self.loss(batch, kl_weight)

    def fit_classifier(self, x: Tensor, y: Tensor, steps: int, batch_size: int) -> dict[str, float]:
        """A stage after the main loop that fits the classifier on labelled data (default: none)."""
        return {}

    # --- using a trained model --------------------------------------------------------------------
    def elbo_parts(self, x: Tensor) -> dict[str, Tensor]:
        """Per-example `recon` (-log p(x|z)) and `kl` terms of the ELBO, in nats."""
        raise NotImplementedError

    def log_weights(self, x: Tensor, k: int, levels: int | None = None) -> Tensor:
        """(B, k) importance log-weights log p(x, latents) - log q(latents | x), each with fresh latents
        drawn from q (Burda et al. 2016); `levels` scores x on that grid of values (see Gaussian.nll)."""
        raise NotImplementedError

    def latent_means(self, x: Tensor) -> Tensor:
        """(B, latent_dim) posterior means E[z | x]: the codes for probes, maps and interpolation."""
        raise NotImplementedError

    def latent_posterior(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(mean, log-variance) of q(z | x), each (B, latent_dim): what `vae embed` and the exported encoder
        give; their mean is `latent_means`."""
        raise NotImplementedError

    def decode_latents(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        """Images in [0, 1] from latent codes as `latent_means` gives them (class y where it matters)."""
        raise NotImplementedError

    def predict_logits(self, x: Tensor) -> Tensor:
        """Class logits (B, num_classes) of the model's best classifier, float32."""
        raise NotImplementedError

    def predict_proba(self, x: Tensor) -> Tensor:
        """Class probabilities (B, num_classes): the softmax of `predict_logits`."""
        return torch.softmax(self.predict_logits(x).float(), 1)

    def class_probs(self, x: Tensor) -> Tensor:
        """What every command predicts with: `predict_proba`, averaged with the mirror image's when the
        recipe asks (`model.test_flip`; a model trained on random flips gives both views a vote)."""
        return self._with_mirror(self.predict_proba, x)

    def _with_mirror(self, fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
        """fn(x) in float32, averaged with fn of the mirror image under `model.test_flip` (images only)."""
        out = fn(x).float()
        if self.cfg.test_flip and x.ndim == 4:
            out = (out + fn(x.flip(-1)).float()) / 2
        return out

    def energy(self, x: Tensor) -> Tensor:
        """(B,) logsumexp of the class logits, the negative free energy of Liu et al. 2020 ("Energy-based
        out-of-distribution detection"): higher for inputs like the training data. Unlike the maximum softmax
        probability it keeps the logits' scale, which an unfamiliar input tends to shrink. Averaged with the
        mirror image's under `model.test_flip`, as `class_probs` is."""
        return self._with_mirror(lambda v: torch.logsumexp(self.predict_logits(v).float(), 1), x)

    def features(self, x: Tensor) -> Tensor:
        """(B, D) the representation the `knn` reject score compares images in (default: the latent means;
        M2: its classifier's trunk)."""
        return self.latent_means(x)

    def ood_features(self, x: Tensor) -> Tensor:
        """`features`, averaged with the mirror image's under `model.test_flip`, as `class_probs` is."""
        return self._with_mirror(self.features, x)

    @property
    def has_rotation_head(self) -> bool:
        """Whether `upright_logp` has a head to answer from (only M2 on images with `model.rotation` > 0)."""
        return hasattr(self, "rotation_head")

    def upright_logp(self, x: Tensor) -> Tensor | None:
        """(B,) log p(x is the right way up) from a self-supervised rotation head; None without one."""
        return None

    @property
    def has_colour_head(self) -> bool:
        """Whether `colour_logp` has a head to answer from (only M2 on colour images, `model.colour_order` > 0)."""
        return hasattr(self, "colour_head")

    def colour_logp(self, x: Tensor) -> Tensor | None:
        """(B,) log p(x has its true colours) from a self-supervised colour-order head; None without one."""
        return None

    @property
    def has_hierarchy(self) -> bool:
        """Whether `level_ratio` has latent levels to compare (only a ladder with latents at two resolutions or more:
        `hvae`, `m2h`)."""
        return False

    def level_ratio(self, x: Tensor, k: int, full: Tensor | None = None) -> Tensor | None:
        """(B,) the likelihood ratio between a hierarchical model's top levels and the whole of it (Havtorn et
        al. 2021); None for a model with one level of latents. `full`: (B,) the whole model's IWAE bound with k
        samples, when the caller has measured it already."""
        return None

    def sample(self, n: int, y: Tensor | None = None, temperature: float = 1.0) -> Tensor:
        """n images in [0, 1]; class-conditional when y is given."""
        raise NotImplementedError

    def reconstruct(self, x: Tensor) -> Tensor:
        """Images in [0, 1] decoded from the posterior mean of x."""
        raise NotImplementedError

    @property
    def latent_size(self) -> int:
        """Dimensions of `latent_means` / `latent_posterior` (the recipe's `model.latent_dim` unless the model
        says otherwise: a hierarchical model's code is its coarsest latent groups)."""
        return self.cfg.latent_dim

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device
