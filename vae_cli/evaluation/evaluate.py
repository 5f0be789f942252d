"""`vae eval`'s numbers for one split, computed in one pass over the images (plus one importance-sampling
pass when asked). The returned dict's keys are the `--json` contract, documented in docs/METRICS.md and
checked against it by tests/test_metrics.py.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from vae_cli.core.pool import map_batches
from vae_cli.core.runtime import Runtime, seeded
from vae_cli.evaluation import metrics
from vae_cli.models.likelihoods import LIKELIHOODS, decoder_channels


def _on_device(xb: Tensor, runtime: Runtime) -> Tensor:
    xb = xb.to(runtime.device, non_blocking=True)
    # the layout of the loaded conv weights (artifacts/checkpoint.load)
    return xb.contiguous(memory_format=torch.channels_last) if xb.ndim == 4 else xb


def _batched(fn, x: Tensor, runtime: Runtime, batch_size: int, seed: int = 0) -> list[Tensor]:
    """fn over x batch by batch on the model's device (on the CPU each batch on one thread: `core/pool.py`),
    results back on the CPU as float32."""
    def one(xb: Tensor) -> Tensor:
        with runtime.autocast(cache=False):
            return fn(_on_device(xb, runtime)).float().cpu()
    return map_batches(one, x.split(batch_size), runtime.device, seed)


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


# Elements of one IWAE chunk's decoder parameters: on the CPU a chunk stays in the allocator's reused memory
# (glibc maps each block above 32 MB anew, and the page faults of two batches at once queue on one lock):
# CIFAR-10 k=16 on 1,024 images, 27.6 s at 2**28 on two threads, 22.0 s at 2**22 on two one-thread batches.
ROW_BUDGET = {"cpu": 2**22, "cuda": 2**28}


def iwae_rows(model, device: torch.device | None = None) -> int:
    """How many (image, sample) rows the IWAE pass decodes at once: 8,192, fewer when the likelihood's parameters
    per image are many, so a chunk's tensors stay near `ROW_BUDGET` elements. With the 10-component mixture on
    CIFAR-10 (100 x 32 x 32 per image) 8,192 rows made gigabyte tensors: k=100 on 128 images took 55.9 s, 31.0 s
    at 1,024 rows (BENCHMARKS.md, session 15); at 64 rows, less again (session 25)."""
    budget = ROW_BUDGET["cuda" if device is not None and device.type == "cuda" else "cpu"]
    shape = tuple(model.image_shape)
    if len(shape) != 3:
        return 8192
    per_row = decoder_channels(model.cfg, shape) * shape[1] * shape[2]
    return max(64, min(8192, budget // per_row))


def log_likelihood(model, x: Tensor, k: int, levels: int | None, runtime: Runtime, batch_size: int = 256,
                   seed: int = 0, progress: Callable[[int], None] | None = None) -> Tensor:
    """Per-image IWAE estimates of log p(x) (nats), on the CPU; `progress(n)` after every n images."""
    model.eval()
    rows = iwae_rows(model, runtime.device)
    batch_size = min(batch_size, rows)  # a chunk of one sample per image stays within the budget too

    def one(xb: Tensor) -> Tensor:
        xb = xb.to(runtime.device, non_blocking=True)
        return metrics.iwae_log_likelihood(model, xb, k, levels, lambda: runtime.autocast(cache=False), rows).cpu()
    with seeded(seed, runtime.device):
        out = map_batches(one, x.split(batch_size), runtime.device, seed,
                          progress=(lambda xb: progress(len(xb))) if progress is not None else None)
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
                         batch_size, seed)
        out["recon_accuracy"] = (torch.cat(recon).long() == y.cpu()).float().mean().item()
        if model.class_conditional:
            wanted = torch.arange(model.num_classes).repeat_interleave(per_class)

            def judged(yb: Tensor) -> Tensor:
                with runtime.autocast(cache=False):
                    pics = model.sample(len(yb), yb.to(runtime.device)).float()
                    return model.class_probs(pics).argmax(1).cpu()
            got = map_batches(judged, wanted.split(batch_size), runtime.device, seed + 1)
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
    batch_size = max(1, min(batch_size, iwae_rows(model, runtime.device) // k))  # both bounds in one chunk
    pairs = zip(x.split(batch_size), full.split(batch_size)) if full is not None else \
        ((xb, None) for xb in x.split(batch_size))  # lazily: a streamed split decodes as the work goes

    def one(pair) -> Tensor:
        xb, fb = pair
        with runtime.autocast(cache=False):
            xb = _on_device(xb, runtime)
            return model.level_ratio(xb, k, None if fb is None else fb.to(xb.device)).float().cpu()
    with seeded(seed, runtime.device):
        out = map_batches(one, pairs, runtime.device, seed)
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
    batch_size = min(batch_size, iwae_rows(model, runtime.device))  # the decoder's parameters stay small

    def one(xb: Tensor) -> tuple[Tensor, ...]:  # one pass: each batch moves to the device once
        xb = xb.to(runtime.device, non_blocking=True)
        with runtime.autocast(cache=False):
            parts = model.elbo_parts(xb)
            return (parts["recon"].float().cpu(), parts["kl"].float().cpu(), model.class_probs(xb).float().cpu(),
                    model.latent_means(xb).float().cpu())
    with seeded(seed, runtime.device):
        rows = map_batches(one, x.split(batch_size), runtime.device, seed)
    recon, kl, probs, means = zip(*rows) if rows else ([], [], [], [])
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
