"""`vae eval`'s numbers for one split, computed in one pass over the images (plus one importance-sampling
pass when asked). The returned dict's keys are the `--json` contract, documented in docs/METRICS.md and
checked against it by tests/test_metrics.py.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from vae_cli.core.runtime import Runtime, seeded
from vae_cli.evaluation import metrics
from vae_cli.models.likelihoods import LIKELIHOODS, decoder_channels


@torch.no_grad()
def _batched(fn, x: Tensor, runtime: Runtime, batch_size: int) -> list[Tensor]:
    """fn over x batch by batch on the model's device, results back on the CPU as float32."""
    out = []
    for xb in x.split(batch_size):
        xb = xb.to(runtime.device, non_blocking=True)
        if xb.ndim == 4:  # the layout of the loaded conv weights (artifacts/checkpoint.load)
            xb = xb.contiguous(memory_format=torch.channels_last)
        with runtime.autocast():
            out.append(fn(xb).float().cpu())
    return out


def predict(model, x: Tensor, runtime: Runtime, batch_size: int = 512) -> Tensor:
    """Class probabilities for x (moved to the model's device batch by batch)."""
    model.eval()
    out = _batched(model.class_probs, x, runtime, batch_size)
    return torch.cat(out) if out else torch.empty(0, model.num_classes)


def energy(model, x: Tensor, runtime: Runtime, batch_size: int = 512) -> Tensor:
    """logsumexp of the class logits per image (Liu et al. 2020), as `Model.energy` gives it."""
    model.eval()
    out = _batched(model.energy, x, runtime, batch_size)
    return torch.cat(out) if out else torch.empty(0)


def features(model, x: Tensor, runtime: Runtime, batch_size: int = 512) -> Tensor:
    """`Model.ood_features` per image: what the knn reject score compares."""
    model.eval()
    out = _batched(model.ood_features, x, runtime, batch_size)
    return torch.cat(out) if out else torch.empty(0, 0)


def upright(model, x: Tensor, runtime: Runtime, batch_size: int = 512) -> Tensor | None:
    """log p(upright | x) from the model's rotation head, or None when it has none."""
    return _head_score(model, model.has_rotation_head, model.upright_logp, x, runtime, batch_size)


def true_colours(model, x: Tensor, runtime: Runtime, batch_size: int = 512) -> Tensor | None:
    """log p(true colours | x) from the model's colour-order head, or None when it has none."""
    return _head_score(model, model.has_colour_head, model.colour_logp, x, runtime, batch_size)


def _head_score(model, has: bool, fn, x: Tensor, runtime: Runtime, batch_size: int) -> Tensor | None:
    if not has:
        return None
    model.eval()
    out = _batched(fn, x, runtime, batch_size)
    return torch.cat(out) if out else torch.empty(0)


def latent_means(model, x: Tensor, runtime: Runtime, batch_size: int = 512) -> Tensor:
    model.eval()
    return torch.cat(_batched(model.latent_means, x, runtime, batch_size))


def iwae_rows(model, budget: int = 2**28) -> int:
    """How many (image, sample) rows the IWAE pass decodes at once: 8,192, fewer when the likelihood's parameters
    per image are many, so a chunk's tensors stay near `budget` elements. With the 10-component mixture on CIFAR-10
    (100 x 32 x 32 per image) 8,192 rows made gigabyte tensors: k=100 on 128 images took 55.9 s, 31.0 s at
    1,024 rows (BENCHMARKS.md, session 15)."""
    shape = tuple(model.image_shape)
    if len(shape) != 3:
        return 8192
    per_row = decoder_channels(model.cfg, shape) * shape[1] * shape[2]
    return max(64, min(8192, budget // per_row))


@torch.no_grad()
def log_likelihood(model, x: Tensor, k: int, levels: int | None, runtime: Runtime, batch_size: int = 256,
                   seed: int = 0, progress: Callable[[int], None] | None = None) -> Tensor:
    """Per-image IWAE estimates of log p(x) (nats), on the CPU; `progress(n)` after every n images."""
    model.eval()
    out = []
    with seeded(seed, runtime.device):
        for xb in x.split(batch_size):
            xb = xb.to(runtime.device, non_blocking=True)
            out.append(metrics.iwae_log_likelihood(model, xb, k, levels, runtime.autocast, iwae_rows(model)).cpu())
            if progress is not None:
                progress(len(xb))
    return torch.cat(out) if out else torch.empty(0)


SAMPLES_PER_CLASS = 100  # class-conditional samples per class behind `sample_accuracy`


@torch.no_grad()
def generative_accuracy(model, x: Tensor, y: Tensor, runtime: Runtime, batch_size: int = 512, seed: int = 0,
                        per_class: int = SAMPLES_PER_CLASS) -> dict[str, float | None]:
    """Whether the model's pictures keep their class, judged by the model's own classifier (no downloaded
    network): `recon_accuracy`, its predictions on reconstructions of x against x's labels (a blur keeps no
    class); `sample_accuracy`, on `per_class` samples of each class drawn at temperature 1 against the class
    asked for (the Classification Accuracy Score idea, Ravuri & Vinyals 2019, turned around: the data's
    classifier judges the samples). None where the model has no classifier or no class-conditional sampling."""
    out: dict[str, float | None] = {"recon_accuracy": None, "sample_accuracy": None}
    if not model.has_classifier or len(x) == 0:
        return out
    model.eval()
    with seeded(seed, runtime.device):
        recon = _batched(lambda xb: model.class_probs(model.reconstruct(xb).float()).argmax(1), x, runtime,
                         batch_size)
        out["recon_accuracy"] = (torch.cat(recon).long() == y.cpu()).float().mean().item()
        if model.class_conditional:
            wanted = torch.arange(model.num_classes).repeat_interleave(per_class)
            got = []
            for yb in wanted.split(batch_size):
                with runtime.autocast():
                    pics = model.sample(len(yb), yb.to(runtime.device)).float()
                    got.append(model.class_probs(pics).argmax(1).cpu())
            out["sample_accuracy"] = (torch.cat(got) == wanted).float().mean().item()
    return out


@torch.no_grad()
def level_ratio(model, x: Tensor, k: int, runtime: Runtime, batch_size: int = 256, seed: int = 0,
                full: Tensor | None = None) -> Tensor | None:
    """`Model.level_ratio` per image (float64, on the CPU), or None for a model without a hierarchy. `full`:
    `log_likelihood(model, x, k, None, ...)` when the caller has it, which saves one of the two IWAE passes."""
    if not model.has_hierarchy:
        return None
    model.eval()
    fulls = iter(full.split(batch_size)) if full is not None else None
    with seeded(seed, runtime.device):
        out = _batched(lambda xb: model.level_ratio(xb, k, None if fulls is None else next(fulls).to(xb.device)),
                       x, runtime, batch_size)
    return torch.cat(out).double() if out else torch.empty(0, dtype=torch.float64)


@torch.no_grad()
def evaluate(model, x: Tensor, y: Tensor, classes: list[str], runtime: Runtime, *, batch_size: int = 512,
             seed: int = 0, iw_samples: int = 0, levels: int | None = None,
             probe: tuple[Tensor, Tensor] | None = None, progress: Callable[[int], None] | None = None,
             generative: bool = True) -> dict:
    """All numbers for one split. `iw_samples` > 0 adds the IWAE negative log-likelihood; `probe`, the
    labelled training images (x, y) to fit a linear probe and a kNN vote on latent means; `generative`, the
    classes kept by reconstructions and samples (`generative_accuracy`; the per-epoch numbers leave them out)."""
    model.eval()
    recon, kl, probs, means = [], [], [], []
    with seeded(seed, runtime.device):
        for xb in x.split(batch_size):  # one pass: each batch moves to the device once
            xb = xb.to(runtime.device, non_blocking=True)
            with runtime.autocast():
                parts = model.elbo_parts(xb)
                probs.append(model.class_probs(xb).float().cpu())
                means.append(model.latent_means(xb).float().cpu())
            recon.append(parts["recon"].float().cpu())
            kl.append(parts["kl"].float().cpu())
    recon_t, kl_t = torch.cat(recon), torch.cat(kl)
    means_t = torch.cat(means)
    y_np = y.cpu().numpy()
    res = {"n": len(x), "elbo": -(recon_t + kl_t).mean().item(), "recon": recon_t.mean().item(),
           "kl": kl_t.mean().item(), "latent_dim": means_t.shape[1], "active_units": metrics.active_units(means_t),
           **metrics.classification(torch.cat(probs).numpy(), y_np, classes), "nll": None, "probe": None,
           **(generative_accuracy(model, x, y, runtime, batch_size, seed + 2) if generative
              else {"recon_accuracy": None, "sample_accuracy": None})}
    if iw_samples > 0:
        ll = log_likelihood(model, x, iw_samples, levels, runtime, seed=seed + 1, progress=progress)
        nats = -ll.mean().item()
        dims = int(np.prod(x.shape[1:]))
        res["nll"] = {"nats": nats, "bits_per_dim": metrics.bits_per_dim(nats, dims),
                      "stderr_nats": (ll.std().item() / len(ll) ** 0.5) if len(ll) > 1 else 0.0,
                      "iw_samples": iw_samples, "levels": levels,
                      # a probability of the image, not a density: binary data, or a likelihood discretised
                      # to the data's levels (Gaussian, logistic)
                      "discrete": levels is not None and (levels == 2 or LIKELIHOODS.get(model.cfg.likelihood)
                                                          .discretised)}
    if probe is not None:
        px, py = probe
        res["probe"] = {"labels_per_class": int(np.bincount(py.numpy()).max()),
                        **metrics.latent_probe(latent_means(model, px, runtime).numpy(), py.numpy(),
                                               means_t.numpy(), y_np)}
    return res
