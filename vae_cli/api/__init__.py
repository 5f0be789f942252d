"""The Python API, for notebooks and other programs: the same loading, preprocessing and prediction the
command line uses (`vae classify` and `vae embed` call these functions).

    from vae_cli.api import load

    model = load("runs/digits/model.safetensors")           # device="auto": CUDA when present
    model.classes, model.image_shape                        # ['0', ..., '9'], (1, 8, 8)
    rows = model.classify(["inbox/", "a.png"], top_k=2)     # files, folders, globs: one dict per image
    probs = model.predict_proba(x)                          # x: (N, C, H, W) floats in [0, 1]
    mu, logvar = model.embed(["inbox/"])                    # latent means and log-variances
    images = model.sample(16, cls="3", seed=0)              # (16, C, H, W) in [0, 1]
    x = model.load_images(["a.png", "b.jpg"])               # image files -> model input, as trained

Inputs are paths (files, folders searched recursively, globs) or a float tensor already in the model's
input format. Nothing here prints; bad images raise `vae_cli.core.errors.ImageError` (or are collected
in `failures` by the functions that stream many files).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from vae_cli.artifacts import checkpoint
from vae_cli.core.errors import UsageError
from vae_cli.core.runtime import Runtime, resolve
from vae_cli.data.images import expand_paths, load_for_model
from vae_cli.evaluation import evaluate
from vae_cli.evaluation.classify import classify_paths, decode_batches
from vae_cli.evaluation.reject import gate

__all__ = ["Model", "load"]


@dataclass
class Embedding:
    paths: list[str]
    mean: Tensor  # (N, latent_dim)
    logvar: Tensor  # (N, latent_dim)
    failures: list[str]


class Model:
    """A trained model from its weights file, with the preprocessing it was trained with."""

    def __init__(self, weights: str | Path, device: str = "auto", precision: str = "auto") -> None:
        self.runtime: Runtime = resolve(device, precision)
        self.weights = Path(weights)
        self.net, self.meta = checkpoint.load(self.weights, self.runtime.device)
        self.last_gate = None  # the --reject gate the last classify() applied (score, threshold, rate)

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.meta["image_shape"])

    @property
    def latent_dim(self) -> int:
        return int(self.net.latent_size)

    def load_images(self, paths: Iterable[str | Path]) -> Tensor:
        """Image files, folders and globs -> (N, C, H, W) in the model's input format (ImageError if one is bad)."""
        return load_for_model(expand_paths([str(p) for p in paths]), self.meta)

    def _tensor(self, inputs) -> Tensor:
        if isinstance(inputs, Tensor):
            if tuple(inputs.shape[1:]) != self.image_shape:
                raise UsageError(f"expected images of shape (N, {', '.join(map(str, self.image_shape))}), "
                                 f"got {tuple(inputs.shape)}")
            return inputs.float()
        return self.load_images(inputs)

    def predict_proba(self, inputs, batch_size: int = 512) -> Tensor:
        """Class probabilities (N, classes) of a tensor or of image paths."""
        return evaluate.predict(self.net, self._tensor(inputs), self.runtime, batch_size)

    def classify(self, paths: Iterable[str | Path], top_k: int = 1, batch_size: int = 256, reject: bool = False,
                 reject_rate: float | None = None, reject_score: str | None = None) -> tuple[list[dict], list[str]]:
        """(rows, failures) for image files, folders and globs: each row {path, top: [{class, prob}], and
        with reject: score, rejected}; unreadable files are listed in failures, not raised."""
        return self.classify_files(expand_paths([str(p) for p in paths]), top_k, batch_size, reject, reject_rate,
                                   reject_score)

    def classify_files(self, files: list[Path], top_k: int = 1, batch_size: int = 256, reject: bool = False,
                       reject_rate: float | None = None, reject_score: str | None = None):
        """`classify` for a list of image files already expanded."""
        asked = reject or reject_rate is not None or reject_score is not None
        g = self.last_gate = gate(self.meta, reject_rate, reject_score) if asked else None
        return classify_paths(self.net, self.meta, files, self.runtime, top_k=min(top_k, len(self.classes)),
                              batch_size=batch_size, reject=g)

    def embed(self, inputs, batch_size: int = 256) -> tuple[Tensor, Tensor]:
        """(mean, log-variance) of q(z | x), each (N, latent_dim), of a tensor or of image paths."""
        x = self._tensor(inputs)
        means, logvars = [], []
        for mu, lv in self._posterior(x, batch_size):
            means.append(mu)
            logvars.append(lv)
        d = self.latent_dim
        return (torch.cat(means) if means else torch.empty(0, d), torch.cat(logvars) if logvars else torch.empty(0, d))

    def embed_files(self, files: list[Path], batch_size: int = 256) -> Iterator[Embedding]:
        """Embeddings of image files, batch by batch (decoding the next batch while this one runs), so a
        folder larger than memory streams; bad files are collected per batch."""
        for good, x, failures in decode_batches(files, self.meta, batch_size):
            if x is None:
                yield Embedding([], torch.empty(0, self.latent_dim), torch.empty(0, self.latent_dim), failures)
                continue
            mu, lv = self.embed(x, batch_size)
            yield Embedding([str(p) for p in good], mu, lv, failures)

    def _posterior(self, x: Tensor, batch_size: int):
        self.net.eval()
        with torch.no_grad():
            for xb in x.split(batch_size):
                with self.runtime.autocast():
                    mu, lv = self.net.latent_posterior(xb.to(self.runtime.device))
                yield mu.float().cpu(), lv.float().cpu()

    def class_index(self, cls: str | int) -> int:
        if isinstance(cls, int) or (isinstance(cls, str) and cls not in self.classes and cls.isdigit()):
            if 0 <= int(cls) < len(self.classes):
                return int(cls)
        elif cls in self.classes:
            return self.classes.index(cls)
        raise UsageError(f"class '{cls}' is not one of the model's classes: {', '.join(self.classes)}")

    def sample(self, n: int, cls: str | int | None = None, temperature: float = 1.0, seed: int = 0) -> Tensor:
        """n images (n, C, H, W) in [0, 1] from the prior; of one class when `cls` is given."""
        dev = self.runtime.device
        self.net.eval()
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []), torch.no_grad():
            torch.manual_seed(seed)
            y = None if cls is None else torch.full((n,), self.class_index(cls), device=dev)
            with self.runtime.autocast():
                return self.net.sample(n, y, temperature).float().cpu()

    def reconstruct(self, inputs, batch_size: int = 256) -> Tensor:
        """Images decoded from the posterior means of a tensor or of image paths."""
        x = self._tensor(inputs)
        self.net.eval()
        with torch.no_grad(), self.runtime.autocast():
            return torch.cat([self.net.reconstruct(xb.to(self.runtime.device)).float().cpu()
                              for xb in x.split(batch_size)])


def load(weights: str | Path, device: str = "auto", precision: str = "auto") -> Model:
    """A trained model from a weights file written by `vae train` (safetensors; nothing is unpickled)."""
    return Model(weights, device, precision)
