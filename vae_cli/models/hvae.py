"""A hierarchical VAE sized for a CPU: a top-down ladder of latent groups at two or three resolutions, after
VDVAE (Child 2021, "Very deep VAEs generalize autoregressive models and can outperform them on images") and
NVAE (Vahdat & Kautz 2020), with the M1 classifier of `vae` on its coarsest latents.

    bottom-up   x -> stem -> [blocks, pool] per resolution      (activations kept where latents live)
    top-down    h0 (learned, coarsest) -> for each latent resolution, coarse to fine:
                    `model.depth` groups:  p(z_i | z_<i) and q(z_i | x, z_<i) from h (and the bottom-up
                    activation for q); h += proj(z_i); h = block(h)
                -> upsample + blocks to the image's size -> likelihood parameters per pixel

Why this shape:
- Latents at several resolutions let the coarse groups hold what the image shows and the finer ones its
  layout and textures; one global vector (the `vae` model) has to squeeze both through a few dozen numbers,
  which on photos ends as a coloured blur (issue #29: 7.3 bits/dim, 54 nats of KL).
- Skip-free: the top-down path sees the image only through the sampled z, never through the bottom-up
  activations directly, so the latents must carry the image and reconstructions are the model's own.
- The image's own resolution carries no latent (`model.latent_levels` counts from the coarsest): a latent
  per pixel could copy the pixels; its blocks upsample the finest latents' features instead.
- Bottleneck residual blocks (1x1, 3x3, 3x3, 1x1 at a quarter of the width, VDVAE's) keep a step cheap enough
  for two CPU cores; the last conv of every residual branch starts scaled by 1/sqrt(blocks), so the
  residual stream starts near the identity (VDVAE, section 4).
- The likelihood is the recipe's (`model.likelihood`; `logistic_mixture` for photos: PixelCNN++'s coupled
  colour mixture, VDVAE's and NVAE's output).
- Stabilisers: posterior and prior scales are softplus-bounded (NVAE, section 3.2 bounds them the same way:
  no exp() of a large activation), every group's KL is computed in float32 from float32 heads, KL warm-up
  (`train.kl_warmup_epochs`), gradient-norm skipping (`train.grad_skip`) and the weights' moving average
  (`train.ema`) in the recipe.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vae_cli.core import rng
from vae_cli.core.pool import map_batches
from vae_cli.models import losses
from vae_cli.models.base import Model
from vae_cli.models.likelihoods import decoder_channels, make_likelihood
from vae_cli.models.nets import fp32
from vae_cli.models.ppca import CodeDensity
from vae_cli.models.registry import register
from vae_cli.models.vae import M1Head

MIN_STD = 1e-3  # the smallest latent standard deviation: keeps log-densities and the KL finite


def resolutions(h: int, w: int) -> list[tuple[int, int]]:
    """The ladder's resolutions, the image's first: halved while even and at least 8 pixels (32 -> 16, 8, 4;
    28 -> 14, 7; 8 -> 4)."""
    out = [(h, w)]
    while h % 2 == 0 and w % 2 == 0 and min(h, w) >= 8 and len(out) < 5:
        h, w = h // 2, w // 2
        out.append((h, w))
    return out


def latent_resolutions(h: int, w: int, levels: int) -> list[tuple[int, int]]:
    """The resolutions that carry latents, coarsest first: the `levels` coarsest below the image's own."""
    below = resolutions(h, w)[1:]
    return below[::-1][:levels] if below else [(h, w)]


def top_level_ratio(log_weights, finest: int, x: Tensor, k: int, full: Tensor | None = None) -> Tensor:
    """log p^{>k}(x) - log p(x), both IWAE bounds with k samples, where p^{>k} draws the finest resolution's
    groups (from index `finest` on) from their prior instead of the posterior (Havtorn, Frellsen, Hauberg &
    Maaloe 2021, "Hierarchical VAEs know what they don't know", the negated LLR^{>k}). The finest latents model
    local texture that any photo has and that drives the full likelihood (why a photo model rates simple
    foreign images likely, Nalisnick et al. 2019); the ratio asks how much of x the top levels alone explain.
    Higher: more like the training data. `log_weights(x, k, prior_from=None)`: a ladder's importance weights;
    `full`: log p(x)'s bound with k samples when the caller has it already (the `likelihood` score's pass), so
    the ratio costs one ladder pass instead of two."""
    if full is None:
        full = losses.iwae_bound(log_weights(x, k))
    top = losses.iwae_bound(log_weights(x, k, prior_from=finest))
    return top - full


def _scale_std(raw: Tensor) -> Tensor:
    """A standard deviation from an unbounded activation: softplus, so large activations grow it linearly,
    not exponentially (NVAE's bound); 0.5413 = softplus^-1(1), so a zero activation is a unit scale."""
    return F.softplus(raw.float() + 0.5413) + MIN_STD


class Block(nn.Module):
    """VDVAE's bottleneck block: GELU, 1x1 down to `mid`, two 3x3, 1x1 up to `c_out`; added to its input when
    `residual`. `fp32_out`: the last 1x1 runs in float32 (heads whose outputs feed the KL)."""

    def __init__(self, c_in: int, mid: int, c_out: int, residual: bool, last_scale: float = 1.0,
                 fp32_out: bool = False):
        super().__init__()
        self.residual, self.fp32_out = residual, fp32_out
        self.body = nn.Sequential(nn.GELU(), nn.Conv2d(c_in, mid, 1), nn.GELU(), nn.Conv2d(mid, mid, 3, padding=1),
                                  nn.GELU(), nn.Conv2d(mid, mid, 3, padding=1), nn.GELU())
        self.last = nn.Conv2d(mid, c_out, 1)
        with torch.no_grad():
            self.last.weight.mul_(last_scale)

    def forward(self, x: Tensor) -> Tensor:
        h = self.body(x)
        h = fp32(self.last, h) if self.fp32_out else self.last(h)
        return x + h if self.residual else h


class TopDownGroup(nn.Module):
    """One latent group: the prior p(z | h) and posterior q(z | h, bottom-up) as diagonal Gaussians over
    `zc` channels at the current resolution, then z folded into the top-down state (VDVAE's DecBlock)."""

    def __init__(self, width: int, mid: int, zc: int, scale: float):
        super().__init__()
        self.zc = zc
        self.posterior = Block(2 * width, mid, 2 * zc, residual=False, fp32_out=True)
        self.prior = Block(width, mid, 2 * zc + width, residual=False, fp32_out=True)
        with torch.no_grad():  # the prior's share of the state starts at zero: h passes through unchanged
            self.prior.last.weight[2 * zc:].zero_()
            self.prior.last.bias[2 * zc:].zero_()
        self.z_in = nn.Conv2d(zc, width, 1)
        with torch.no_grad():
            self.z_in.weight.mul_(scale)
        self.res = Block(width, mid, width, residual=True, last_scale=scale)

    def forward(self, h: Tensor, enc: Tensor | None, mode: str, temperature: float = 1.0,
                z_given: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """mode: "sample" (z ~ q; the KL in closed form), "weights" (z ~ q; log q(z) - log p(z) at z, for the
        IWAE bound), "mean" (z = the posterior mean), "prior" (z ~ p at `temperature`), or z_given."""
        zc = self.zc
        # split, not slices: a slice's backward fills a zero tensor the input's size for every piece
        pm, ps, h_prior = self.prior(h).split([zc, zc, h.shape[1]], 1)
        ps = _scale_std(ps)
        h = h + h_prior.to(h.dtype)
        out: dict[str, Tensor] = {}
        if z_given is not None:
            z = z_given
        elif mode == "prior":
            z = pm + ps * rng.randn_like(pm) * temperature
        else:
            qm, qs = self.posterior(torch.cat([h, enc.to(h.dtype)], 1)).chunk(2, 1)
            qs = _scale_std(qs)
            out["mean"] = qm
            out["logvar"] = q_logvar = 2 * torch.log(qs)
            if mode == "mean":
                z = qm
            else:
                z = qm + qs * rng.randn_like(qm)
                p_logvar = 2 * torch.log(ps)
                if mode == "sample":
                    out["kl"] = losses.gaussian_kl_two(qm, q_logvar, pm, p_logvar)
                else:
                    out["log_ratio"] = (losses.gaussian_log_density(z, qm, q_logvar)
                                        - losses.gaussian_log_density(z, pm, p_logvar))
        h = h + self.z_in(z.to(h.dtype))
        return self.res(h), out


@register("hvae")
class HVAE(M1Head, CodeDensity, Model):
    """Hierarchical VAE (VDVAE/NVAE-style top-down ladder) with an M1 classifier on its coarsest latents."""

    needs_labelled_batch = False  # unsupervised; labels are used after the loop, by fit_classifier
    reads = ("width", "latent_channels", "depth", "latent_levels", "likelihood", "mixtures", "beta", "head_hidden",
             "dropout", "test_flip")

    def __init__(self, cfg, image_shape, num_classes, conditional: bool = False):
        """`conditional`: p(x|y,z), the class weights (B, K) added to the top-down path's start (`m2h` uses the
        ladder so, as M2's decoder); such a ladder has no M1 classifier of its own."""
        super().__init__(cfg, image_shape, num_classes)
        if len(image_shape) != 3:
            raise ValueError("hvae models images (C, H, W), not vectors")
        c, h, w = image_shape
        width, zc = cfg.width, cfg.latent_channels
        mid = max(8, width // 4)
        ladder = resolutions(h, w)
        # space-to-depth: every conv runs at half the image's size or less (2x2 pixels become 4c channels in,
        # 4 x the likelihood's parameters out); a 32x32 layer costs 4 of the 16x16 ones
        self.patch = 2 if len(ladder) > 1 else 1
        self.res = ladder[1:] if self.patch == 2 else ladder
        self.latent_res = latent_resolutions(h, w, cfg.latent_levels)
        groups = cfg.depth * len(self.latent_res)
        scale = 1.0 / math.sqrt(groups + len(self.res))
        # bottom-up: one residual block per resolution, average-pooled down to the next
        self.stem = nn.Conv2d(c * self.patch ** 2, width, 3, padding=1)
        self.up_blocks = nn.ModuleList(Block(width, mid, width, residual=True, last_scale=scale) for _ in self.res)
        # top-down: a learned start at the coarsest latent resolution, the groups, then blocks to full size
        top = self.latent_res[0]
        self.h0 = nn.Parameter(torch.zeros(1, width, *top))
        self.groups = nn.ModuleList(TopDownGroup(width, mid, zc, scale) for _ in range(groups))
        finer = [r for r in self.res if r[0] > self.latent_res[-1][0]][::-1]  # below the finest latents
        self.out_res = finer
        self.out_blocks = nn.ModuleList(Block(width, mid, width, residual=True, last_scale=scale) for _ in finer)
        self.likelihood = make_likelihood(cfg, self.image_shape)
        self.to_params = nn.Conv2d(width, decoder_channels(cfg, self.image_shape) * self.patch ** 2, 1)
        self.code_dim = cfg.depth * zc * top[0] * top[1]  # the M1 code: every group at the coarsest resolution
        self.group_shapes = [(zc, *r) for r in self.latent_res for _ in range(cfg.depth)]
        self.codes_dim = sum(math.prod(s) for s in self.group_shapes)  # every group: what class samples draw
        if conditional:
            self.y_in = nn.Linear(num_classes, width)
        else:
            self._init_m1(self.code_dim, num_classes, cfg.head_hidden, cfg.dropout)
            self._init_code_density(self.codes_dim, num_classes)

    @property
    def latent_size(self) -> int:
        return self.code_dim

    # --- the two paths --------------------------------------------------------------------------------
    def bottom_up(self, x: Tensor) -> dict[tuple[int, int], Tensor]:
        """Activations at every latent resolution."""
        h, acts = self.stem(F.pixel_unshuffle(x, self.patch) if self.patch > 1 else x), {}
        for i, (r, block) in enumerate(zip(self.res, self.up_blocks)):
            h = block(h)
            acts[r] = h
            if i + 1 < len(self.res):
                h = F.avg_pool2d(h, 2)
        return acts

    def top_down(self, n: int, acts: dict | None, mode: str, temperature: float = 1.0, top_codes: Tensor | None = None,
                 prior_from: int | None = None, y: Tensor | None = None) -> tuple[Tensor, list[dict[str, Tensor]]]:
        """Decoder parameters and every group's outputs. `top_codes` (n, D) fixes the first groups, D their
        sizes added: `code_dim` the coarsest resolution's (interpolation), `codes_dim` all of them (class
        samples, `CodeDensity`); the rest follow `mode`, except groups
        from index `prior_from` on, which draw from their prior (`level_ratio`). `y`: class weights (n, K) of a
        conditional ladder."""
        # the batch size from a tensor where there is one, so an exported graph keeps a dynamic batch
        ref = next(iter(acts.values())) if acts is not None else top_codes if top_codes is not None else y
        n = ref.shape[0] if ref is not None else n
        h = self.h0.expand(n, -1, -1, -1)
        if y is not None:
            h = h + fp32(self.y_in, y)[:, :, None, None]
        if acts is not None:
            h = h.to(next(iter(acts.values())).dtype)
        given = self._split_codes(top_codes) if top_codes is not None else []
        outs, g = [], 0
        for r in self.latent_res:
            if h.shape[-2:] != r:
                h = F.interpolate(h, size=r, mode="nearest")
            for _ in range(self.cfg.depth):
                z_given = given[g] if g < len(given) else None
                group_mode = "prior" if prior_from is not None and g >= prior_from else mode
                h, o = self.groups[g](h, acts[r] if acts is not None else None, group_mode, temperature, z_given)
                outs.append(o)
                g += 1
        for r, block in zip(self.out_res, self.out_blocks):
            h = block(F.interpolate(h, size=r, mode="nearest"))
        params = fp32(self.to_params, h)
        return (F.pixel_shuffle(params, self.patch) if self.patch > 1 else params), outs

    def _split_codes(self, codes: Tensor) -> list[Tensor]:
        """Flat codes (n, D) as the first groups' z, coarsest first (D: those groups' sizes added)."""
        out, i = [], 0
        for shape in self.group_shapes:
            d = math.prod(shape)
            if i + d > codes.shape[1]:
                break
            out.append(codes[:, i:i + d].reshape(-1, *shape))
            i += d
        if i != codes.shape[1]:
            raise ValueError(f"{codes.shape[1]} code values do not fill whole latent groups")
        return out

    def all_codes(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(mean, log-variance) of every group's posterior, each group given the means of those before it,
        flattened coarsest first (`codes_dim` numbers an image; the first `code_dim` are `latent_posterior`'s):
        what `CodeDensity` fits."""
        _, outs = self.top_down(len(x), self.bottom_up(x), "mean", y=y)
        return (torch.cat([o["mean"].flatten(1) for o in outs], 1).float(),
                torch.cat([o["logvar"].flatten(1) for o in outs], 1).float())

    def _kl(self, outs: list[dict[str, Tensor]]) -> Tensor:
        return torch.stack([o["kl"] for o in outs], 0).sum(0)

    # --- training and scoring -------------------------------------------------------------------------
    def loss(self, batch, kl_weight):
        recon, kl = self.neg_elbo_parts(batch.x)
        return losses.elbo_terms(recon, kl, kl_weight * self.cfg.beta)

    def elbo_parts(self, x):
        recon, kl = self.neg_elbo_parts(x)
        return {"recon": recon, "kl": kl}

    def log_weights(self, x, k, levels=None, prior_from: int | None = None, y: Tensor | None = None):
        """`prior_from`: groups from this index on are drawn from their prior, not q (then their p/q ratio is 1):
        the bound L^{>k} of Havtorn et al. 2021 that only the top levels inform. `y` (B * k, K): class weights
        of a conditional ladder, one row per draw."""
        b = len(x)
        acts = {r: a.repeat_interleave(k, 0) for r, a in self.bottom_up(x).items()}  # the encoder runs once
        params, outs = self.top_down(b * k, acts, "weights", prior_from=prior_from, y=y)
        nll = self.likelihood.nll(params, x.repeat_interleave(k, 0), levels)
        log_ratio = torch.stack([o["log_ratio"] for o in outs if "log_ratio" in o], 0).sum(0)
        return (-nll - log_ratio).view(b, k)

    def neg_elbo_parts(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(-log p(x|z) with z ~ q, the KL of every group in closed form), per image; `y`: class weights."""
        params, outs = self.top_down(len(x), self.bottom_up(x), "sample", y=y)
        return self.likelihood.nll(params, x), self._kl(outs)

    @property
    def has_hierarchy(self) -> bool:
        return len(self.groups) > self.cfg.depth

    @property
    def finest_group(self) -> int:
        """The index of the finest resolution's first latent group."""
        return len(self.groups) - self.cfg.depth

    def level_ratio(self, x, k, full=None):
        return top_level_ratio(self.log_weights, self.finest_group, x, k, full) if self.has_hierarchy else None

    def latent_posterior(self, x, y: Tensor | None = None):
        """(mean, log-variance) of the coarsest resolution's groups, flattened, with every group before them
        at its posterior mean: the code for probes, `vae embed` and the M1 classifier."""
        _, outs = self.top_down(len(x), self.bottom_up(x), "mean", y=y)
        top = outs[:self.cfg.depth]
        return (torch.cat([o["mean"].flatten(1) for o in top], 1).float(),
                torch.cat([o["logvar"].flatten(1) for o in top], 1).float())

    def latent_means(self, x):
        return self.latent_posterior(x)[0]

    # --- generation ---------------------------------------------------------------------------------
    def decode_latents(self, z, y=None):
        """Images from coarsest-level codes; the finer groups at their prior means (temperature 0)."""
        params, _ = self.top_down(len(z), None, "prior", 0.0, top_codes=z)
        return self.likelihood.mean(params)

    def fit_classifier(self, x, y, steps, batch_size):
        """The M1 head and class codes (`M1Head`), and the per-class PPCA over every group (`CodeDensity`), from
        one ladder pass over the labelled images (the coarsest codes are the first `code_dim` of every group's)."""
        with torch.no_grad():
            self.eval()
            parts = map_batches(self.all_codes, x.split(512), x.device)  # on all the cores, the same bits
            mean, logvar = torch.cat([m for m, _ in parts]), torch.cat([v for _, v in parts])
            self.fit_code_density(mean, y, logvar)
        d = self.code_dim
        return self.fit_head(mean[:, :d].contiguous(), logvar[:, :d].contiguous(), y, steps, batch_size)

    def sample(self, n, y=None, temperature=1.0):
        """n images; y (indices): their classes, every group from the class's PPCA (`CodeDensity`; a file from
        before it: the coarsest groups from the class codes, the rest from the prior). Without y, once the
        densities are fitted, the classes in turn (as `m2h` does): a draw from their mixture (Tipping & Bishop
        1999b, "Mixtures of probabilistic principal component analyzers"), where the ladder's own prior draws
        textures (BENCHMARKS.md, session 15); a model with no labels to fit them on samples from the prior."""
        if self.has_code_density:
            y = torch.arange(n, device=self.code_mean.device) % len(self.code_mean) if y is None else y
            return self.draw(n, temperature, top_codes=self.draw_class_codes(y, temperature))
        codes = self.class_codes(y, temperature) if y is not None else None
        return self.draw(n, temperature, top_codes=codes)

    def draw(self, n: int, temperature: float = 1.0, top_codes: Tensor | None = None,
             y: Tensor | None = None) -> Tensor:
        """n images from the prior at `temperature` (the coarsest groups fixed by `top_codes`; `y`: class
        weights of a conditional ladder)."""
        params, _ = self.top_down(n, None, "prior", temperature, top_codes=top_codes, y=y)
        return self.likelihood.mean(params)

    def reconstruct(self, x, y: Tensor | None = None):
        params, _ = self.top_down(len(x), self.bottom_up(x), "mean", y=y)
        return self.likelihood.mean(params)
