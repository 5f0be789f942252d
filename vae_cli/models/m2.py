"""M2, the semi-supervised generative model of Kingma, Rezende, Mohamed & Welling 2014 ("Semi-supervised
learning with deep generative models", section 3.1.2): a classifier q(y|x), an encoder q(z|x,y) and a
decoder p(x|y,z), trained on

    labelled:    -L(x, y) + alpha * -log q(y|x)                                  (eq. 6 and eq. 9)
    unlabelled:  -U(x) = sum_y q(y|x) * -L(x, y) - H(q(y|x))                     (eq. 7)

The unlabelled bound enumerates all classes in one batched pass: the encoder trunk runs once per image
and only the small heads and the decoder see the (B * K) image-class pairs.

What differs from the paper, each a recipe key:
- q(y|x) and q(z|x,y) share one convolutional trunk (`model.backbone`), so the reconstruction of the
  unlabelled images shapes the features the classifier uses. In the paper they are separate MLPs, and
  unlabelled data reaches the classifier only through eq. 7's weighting, which is weak (11.97% error).
- `model.consistency` > 0 adds an augmentation-consistency term on unlabelled images (FixMatch,
  Sohn et al. 2020): a confident prediction on the weakly augmented image (the recipe's augmentation)
  is the target for a strongly augmented copy.
- The decoder can be an MLP (`model.decoder: mlp`), which keeps the K-fold enumeration cheap.
- `model.rotation` > 0 adds a self-supervised task on the trunk: which of 0/90/180/270 degrees an image
  was turned by (Gidaris et al. 2018; used beside semi-supervised losses in S4L, Zhai et al. 2019). It
  makes the features see which way up an image is, and its head's log p(upright | x) is a rejection
  score that does not come from the likelihood (Hendrycks et al. 2019, "Using self-supervised learning
  can improve model robustness and uncertainty").
- `model.colour_order` > 0 (colour images) adds its colour counterpart: which of the 6 orders of the RGB
  channels an image was given (colour permutation as an input transformation, Lee, Hwang & Shin 2020,
  "Self-supervised label augmentation via input transformations"). Telling a blue sky from a red one
  needs the features to know which colours fit which content, the thing the strong view's colour jitter
  and solarize teach the classifier to ignore; its head's log p(true colours | x) is the rejection score
  for photos whose colours do not fit their content. It shares the rotation task's trunk pass: with both
  tasks on, half the images are turned and half recoloured.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vae_cli.core import rng
from vae_cli.models import losses
from vae_cli.models.base import Batch, Model
from vae_cli.models.likelihoods import decoder_channels, make_likelihood
from vae_cli.models.nets import fp32, make_decoder, make_encoder, mlp, one_hot
from vae_cli.models.registry import register


def m2_unlabelled_bound(q: Tensor, neg_elbo_per_class: Tensor) -> Tensor:
    """-U(x) = sum_y q(y|x) * -L(x,y) - H(q(y|x)) per example (Kingma et al. 2014, eq. 7).

    q: (B, K) class probabilities; neg_elbo_per_class: (B, K) values of -L(x, y) for every y.
    """
    q = q.float()
    entropy = -(q * torch.log(q.clamp_min(1e-12))).sum(1)
    return (q * neg_elbo_per_class.float()).sum(1) - entropy


def random_turns(x: Tensor) -> tuple[Tensor, Tensor]:
    """Each image turned by a random multiple of 90 degrees (of 180 when it is not square), with the turn's
    index (0-3). Drawn through `core.rng` (the shard's generator in training), so a resumed run repeats them."""
    square = x.shape[-1] == x.shape[-2]
    turns = rng.randint(0, 4, (len(x),), device=x.device)
    if not square:
        turns = (turns // 2) * 2
    out = x.clone()
    for k in (1, 2, 3):
        pick = turns == k
        if pick.any():
            out[pick] = torch.rot90(x[pick], k, (2, 3))
    return out, turns


# The 6 orders of three colour channels; order 0 is the image as it is.
CHANNEL_ORDERS = ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0))


def reorder_channels(x: Tensor, orders: Tensor) -> Tensor:
    """Each colour image (B, 3, H, W) with its channels in the order CHANNEL_ORDERS[orders[i]], in x's memory
    layout."""
    idx = torch.tensor(CHANNEL_ORDERS, device=x.device)[orders]  # (B, 3)
    out = torch.empty_like(x)
    out.copy_(x.gather(1, idx[:, :, None, None].expand_as(x)))
    return out


def random_channel_orders(x: Tensor) -> tuple[Tensor, Tensor]:
    """Each colour image with its channels in a random one of the 6 orders, with the order's index. Draws
    through `core.rng` (the shard's generator in training), so a resumed run repeats them."""
    orders = rng.randint(0, len(CHANNEL_ORDERS), (len(x),), device=x.device)
    return reorder_channels(x, orders), orders


def per_step_count(cap: int | None, share: float, n: int) -> int:
    """How many of a shard's n images a per-step count `cap` (None: all) gives it: the count taken in proportion to
    the shard's share of the step (`Batch.share`), so sharding does not multiply it."""
    return n if cap is None else min(n, math.ceil(cap * share))


# The fewest images the consistency term's strong view runs on: batch norm's statistics come from that pass,
# and a handful of confident images early in a run would give it noisy ones.
STRONG_MIN = 64


def strong_subset(conf: Tensor, mask: Tensor, at_least: int) -> Tensor:
    """Indices of the images that go through the strong view: every one whose pseudo-label passed the
    threshold (`mask`), topped up with the next most confident to `at_least`. The others would be weighted by
    zero, so leaving them out gives the same gradient for a fraction of the work while few images pass (early
    in a run, 3% of CIFAR-10's pass; by its end ~70%); only batch norm's statistics see fewer images."""
    want = min(len(conf), max(at_least, int(mask.sum().item())))
    return torch.topk(conf + mask, want, sorted=False).indices.sort().values


@register("m2")
class M2(Model):
    """Semi-supervised VAE: classifier q(y|x), encoder q(z|x,y), decoder p(x|y,z) (Kingma et al. 2014)."""

    reads = ("backbone", "decoder", "latent_dim", "width", "hidden", "likelihood", "mixtures", "beta", "head_hidden",
             "dropout", "test_flip", "alpha", "consistency", "threshold", "unlabelled_elbo_images", "strong_all",
             "align", "rotation", "colour_order")

    def __init__(self, cfg, image_shape, num_classes, input_shape: tuple[int, ...] | None = None):
        super().__init__(cfg, image_shape, num_classes)
        self.input_shape = tuple(input_shape or image_shape)  # M1+M2 feeds latent vectors instead
        K = num_classes
        self.trunk = make_encoder(self.input_shape, cfg)
        self.classifier = nn.Sequential(rng.Dropout(cfg.dropout), mlp(self.trunk.out_dim, cfg.head_hidden, K))
        self._init_generator(cfg)
        if cfg.rotation > 0 and len(self.input_shape) == 3:  # which quarter turn (only 0/180 if not square)
            self.rotation_head = nn.Linear(self.trunk.out_dim, 4)
        if cfg.colour_order > 0 and len(self.input_shape) == 3 and self.input_shape[0] == 3:
            self.colour_head = nn.Linear(self.trunk.out_dim, len(CHANNEL_ORDERS))
        if cfg.align:  # running mean of q(y|x) on unlabelled batches, for distribution alignment
            self.register_buffer("q_mean", torch.full((K,), 1.0 / K))

    def _init_generator(self, cfg) -> None:
        """q(z|x,y) on the trunk's features and p(x|y,z): what a subclass with another decoder replaces."""
        k, K = cfg.latent_dim, self.num_classes
        self.z_head = mlp(self.trunk.out_dim + K, cfg.hidden, 2 * k)
        self.decoder = make_decoder(self.input_shape, cfg, k + K, decoder_channels(cfg, self.input_shape))
        self.likelihood = make_likelihood(cfg, self.input_shape)

    # --- the pieces -------------------------------------------------------------------------------
    def class_logits(self, h: Tensor) -> Tensor:
        return fp32(self.classifier, h)

    def posterior(self, h: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        mu, logvar = fp32(self.z_head, torch.cat([h.float(), one_hot(y, self.num_classes)], 1)).chunk(2, 1)
        return mu, logvar.clamp(-12.0, 8.0)

    def decode(self, z: Tensor, y: Tensor) -> Tensor:
        return self.decoder(torch.cat([z, one_hot(y, self.num_classes, z.dtype)], 1))

    def neg_elbo(self, x: Tensor, h: Tensor, y: Tensor, kl_weight: float = 1.0) -> dict[str, Tensor]:
        """-L(x, y) = E_q(z|x,y)[-log p(x|y,z)] + KL(q(z|x,y) || p(z)) - log p(y), per example (eq. 6);
        p(y) is uniform."""
        mu, logvar = self.posterior(h, y)
        recon = self.likelihood.nll(self.decode(losses.reparameterize(mu, logvar), y), x)
        kl = losses.gaussian_kl(mu, logvar)
        value = recon + kl_weight * self.cfg.beta * kl + math.log(self.num_classes)
        return {"value": value, "recon": recon, "kl": kl}

    def _enumerate(self, x: Tensor, h: Tensor, kl_weight: float = 1.0) -> dict[str, Tensor]:
        """neg_elbo for every (image, class) pair in one pass; each entry (B, K)."""
        b, K = x.shape[0], self.num_classes
        y = torch.arange(K, device=x.device).repeat(b)
        out = self.neg_elbo(x.repeat_interleave(K, 0), h.repeat_interleave(K, 0), y, kl_weight)
        return {k: v.view(b, K) for k, v in out.items()}

    # --- training ---------------------------------------------------------------------------------
    def loss(self, batch: Batch, kl_weight: float) -> dict[str, Tensor]:
        cfg = self.cfg
        h_lab = self.trunk(batch.x_lab)
        lab = self.labelled_bound(batch.x_lab, h_lab, batch.y_lab, kl_weight, batch.share)
        class_loss = F.cross_entropy(self.class_logits(h_lab), batch.y_lab)

        # The batch is a random slice of the shuffled training set, so its first n images are a random
        # subset: the class enumeration (K decoder passes per image) runs on those only when asked, and the
        # rest only give (gradient-free) pseudo-labels to the consistency term.
        n = per_step_count(cfg.unlabelled_elbo_images, batch.share, len(batch.x))
        h = self.trunk(batch.x[:n])
        q = F.softmax(self.class_logits(h), 1)
        q_all = q.detach()
        if n < len(batch.x) and cfg.consistency > 0:
            with torch.no_grad():
                q_all = torch.cat([q_all, F.softmax(self.class_logits(self.trunk(batch.x[n:])), 1)])
        unlab, recon, kl = self.unlabelled_bound(batch.x[:n], h, q, kl_weight, batch.share)
        terms = {"loss": lab + unlab.mean() + cfg.alpha * class_loss, "recon": recon, "kl": kl,
                 "class_loss": class_loss}
        if cfg.consistency > 0 and len(self.input_shape) == 3:
            conf, pseudo = self._pseudo_targets(q_all).max(1)
            mask = (conf >= cfg.threshold).float()
            # images of the batch whose label may be used are their own target, confident or not: with every
            # image labelled (an all-labels recipe) the term is the classifier's cross-entropy on strong views
            # of the whole batch, not only on `train.labelled_batch_size` images a step
            pseudo = torch.where(batch.labelled, batch.y, pseudo)
            mask = torch.where(batch.labelled, torch.ones_like(mask), mask)
            pick = strong_subset(conf, mask, len(batch.x) if cfg.strong_all else STRONG_MIN)
            strong_logits = self.class_logits(self.trunk(batch.strong(batch.x[pick])))
            per_image = F.cross_entropy(strong_logits, pseudo[pick], reduction="none") * mask[pick]
            consistency = per_image.sum() / len(batch.x)  # the mean over the whole batch, as FixMatch's
            terms["loss"] = terms["loss"] + cfg.consistency * consistency
            terms["consistency"] = consistency
            terms["pseudo_rate"] = mask.mean()
        if self.has_rotation_head or self.has_colour_head:
            terms.update(self._transform_tasks(torch.cat([batch.x_lab, batch.x[:n]]), terms["loss"]))
        return terms

    def labelled_bound(self, x: Tensor, h: Tensor, y: Tensor, kl_weight: float, share: float = 1.0) -> Tensor:
        """The batch mean of -L(x, y) over the step's labelled images (eq. 6). `share`: the step's fraction this
        shard holds, for a subclass that caps a per-step count."""
        return self.neg_elbo(x, h, y, kl_weight)["value"].mean()

    def unlabelled_bound(self, x: Tensor, h: Tensor, q: Tensor, kl_weight: float,
                         share: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
        """(-U(x) per image, its reconstruction and KL terms' batch means) for unlabelled images: eq. 7, every
        class enumerated through the decoder (K decoder passes per image)."""
        per_class = self._enumerate(x, h, kl_weight)
        unlab = m2_unlabelled_bound(q, per_class["value"])
        return unlab, (q.detach() * per_class["recon"]).sum(1).mean(), (q.detach() * per_class["kl"]).sum(1).mean()

    def _transform_tasks(self, x: Tensor, loss: Tensor) -> dict[str, Tensor]:
        """The self-supervised tasks on the labelled images and those of the enumeration, in one trunk pass: with
        both heads the first half turned by a random quarter turn, the second half given a random channel
        order (one transformation per image: both at once made each task harder, and accuracy paid for it;
        docs/DECISIONS.md); with one head, every image."""
        cfg, out = self.cfg, {}
        cut = len(x) // 2 if self.has_rotation_head and self.has_colour_head else (
            len(x) if self.has_rotation_head else 0)
        parts, turns, orders = [], None, None
        if cut:
            xr, turns = random_turns(x[:cut])
            parts.append(xr)
        if cut < len(x):
            xc, orders = random_channel_orders(x[cut:])
            parts.append(xc)
        h = self.trunk(torch.cat(parts) if len(parts) > 1 else parts[0])
        if turns is not None:
            out["rotation"] = F.cross_entropy(fp32(self.rotation_head, h[:cut]), turns)
            loss = loss + cfg.rotation * out["rotation"]
        if orders is not None:
            out["colour_order"] = F.cross_entropy(fp32(self.colour_head, h[cut:]), orders)
            loss = loss + cfg.colour_order * out["colour_order"]
        return {"loss": loss, **out}

    @torch.no_grad()
    def _pseudo_targets(self, q: Tensor) -> Tensor:
        """q(y|x) on unlabelled images, with `model.align`: distribution alignment (Berthelot et al. 2020,
        ReMixMatch, section 3.2), q * p(y) / running mean of q, renormalised, so a model that favours some
        classes early does not turn that into pseudo-labels and a self-fulfilling imbalance. p(y) is uniform,
        as M2's prior is."""
        if not self.cfg.align:
            return q
        if self.training:
            self.q_mean.lerp_(q.float().mean(0), 0.01)  # ~ the last 100 batches
        aligned = q.float() / self.q_mean.clamp_min(1e-6)
        return aligned / aligned.sum(1, keepdim=True)

    # --- using a trained model --------------------------------------------------------------------
    def predict_logits(self, x: Tensor) -> Tensor:
        return self.class_logits(self.trunk(x))

    def features(self, x: Tensor) -> Tensor:
        """The trunk's pooled features, which the classifier, the rotation head and q(z|x,y) all read."""
        return self.trunk(x)

    def upright_logp(self, x: Tensor) -> Tensor | None:
        """sum over the turns k of log p(turn k | x turned by k), from the rotation head: how well the image's
        turned copies are told apart, which needs it to look the right way up first (the score of Hendrycks
        et al. 2019, section 4; measured on CIFAR-10 against log p(turn 0 | x) alone: inverted 0.77 / 0.75
        AUROC in the combined score, upside-down 0.85 / 0.82). None without a head (`model.rotation` = 0)."""
        if not self.has_rotation_head:
            return None
        turns = range(4) if x.shape[-1] == x.shape[-2] else (0, 2)
        return sum(F.log_softmax(fp32(self.rotation_head, self.trunk(torch.rot90(x, k, (2, 3)))), 1)[:, k]
                   for k in turns)

    def colour_logp(self, x: Tensor) -> Tensor | None:
        """sum over the channel orders k of log p(order k | x in order k), from the colour-order head: how well
        the image's recoloured copies are told apart, which needs its colours to fit its content first (the
        rotation score's counterpart for colour). None without a head (`model.colour_order` = 0)."""
        if not self.has_colour_head:
            return None
        return sum(F.log_softmax(fp32(self.colour_head, self.trunk(reorder_channels(x, torch.full(
            (len(x),), k, device=x.device)))), 1)[:, k] for k in range(len(CHANNEL_ORDERS)))

    def elbo_parts(self, x: Tensor) -> dict[str, Tensor]:
        """The unlabelled bound split as recon + KL, where KL includes KL(q(y|x) || p(y)). The bound itself:
        `model.beta` weights the KL in training only, as in `vae`, `hvae` and `m2h`."""
        h = self.trunk(x)
        q = F.softmax(self.class_logits(h), 1)
        per_class = self._enumerate(x, h)
        total = m2_unlabelled_bound(q, per_class["recon"] + per_class["kl"] + math.log(self.num_classes))
        recon = (q * per_class["recon"]).sum(1)
        return {"recon": recon, "kl": total - recon}

    def log_weights(self, x: Tensor, k: int, levels: int | None = None) -> Tensor:
        """Latents (y, z) drawn as y ~ q(y|x), z ~ q(z|x,y); p(y) uniform."""
        b, K = x.shape[0], self.num_classes
        h = self.trunk(x)
        log_q = F.log_softmax(self.class_logits(h), 1)
        y = rng.multinomial(log_q.exp(), k, replacement=True).flatten()  # (B*k), image-major
        h_k, log_qy = h.repeat_interleave(k, 0), log_q.repeat_interleave(k, 0).gather(1, y[:, None])[:, 0]
        mu, logvar = self.posterior(h_k, y)
        z = losses.reparameterize(mu, logvar)
        nll = self.likelihood.nll(self.decode(z, y), x.repeat_interleave(k, 0), levels)
        zeros = torch.zeros_like(z)
        log_w = (-nll + losses.gaussian_log_density(z, zeros, zeros) - math.log(K)
                 - losses.gaussian_log_density(z, mu, logvar) - log_qy)
        return log_w.view(b, k)

    def latent_means(self, x: Tensor) -> Tensor:
        """The style code's mean under the predicted class (M2's z is meant to carry what y does not)."""
        return self.latent_posterior(x)[0]

    def latent_posterior(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.trunk(x)
        return self.posterior(h, self.class_logits(h).argmax(1))

    def decode_latents(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        """y: class indices (B,) or class weights (B, K), e.g. a mix of two classes."""
        y = torch.zeros(len(z), dtype=torch.long, device=z.device) if y is None else y
        y_vec = y.to(z.dtype) if y.ndim == 2 else one_hot(y, self.num_classes, z.dtype)
        return self.likelihood.mean(self.decoder(torch.cat([z, y_vec], 1)))

    def sample(self, n: int, y: Tensor | None = None, temperature: float = 1.0) -> Tensor:
        if y is None:
            y = torch.arange(n, device=self.device) % self.num_classes
        z = rng.randn(n, self.cfg.latent_dim, device=self.device) * temperature
        return self.likelihood.mean(self.decode(z, y))

    def reconstruct(self, x: Tensor) -> Tensor:
        h = self.trunk(x)
        y = self.class_logits(h).argmax(1)
        mu, _ = self.posterior(h, y)
        return self.likelihood.mean(self.decode(mu, y))
