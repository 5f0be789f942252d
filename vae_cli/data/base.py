"""The dataset registry, in-memory tensors, and the seeded, stratified splits and labelled subset.

A builder returns the whole dataset decoded once into float32 tensors in [0, 1] (N, C, H, W); the
training loop batches by slicing. Builders register themselves by `data.name`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from vae_cli.core.errors import DataError
from vae_cli.core.registry import Registry
from vae_cli.data.streaming import is_lazy

# The held-back test split of datasets without their own does not move with the training seed, so runs
# with different seeds are scored on the same images.
SPLIT_SEED = 0


@dataclass
class Dataset:
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    classes: list[str]
    labelled: Tensor  # indices into train_x whose labels training may use
    holdout_x: Tensor | None = None  # training-split images kept out of training (calibration)
    holdout_y: Tensor | None = None
    levels: int = 256  # how many values a pixel takes (2 when binarised): the grid for discrete likelihoods
    train_grey: Tensor | None = None  # binarize=stochastic: the grey images each batch is drawn from

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_x.shape[1:])


# data.name -> builder(cfg) returning (train_x, train_y, test_x, test_y, class names) as numpy arrays (or a
# FileImages for a streamed folder). A new dataset is one module with @register_dataset and one import line
# in vae_cli/data/__init__.py.
DATASETS: Registry[Callable] = Registry("dataset", "data.name")


def register_dataset(name: str):
    return DATASETS.register(name)


def stratified_split(y: np.ndarray, fraction: float, seed: int,
                     keep_one: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Indices (keep, held_out) with `fraction` of every class held out (at least one per class; with
    `keep_one`, never a class's last image, so every class still trains)."""
    rng = np.random.RandomState(seed)
    held = []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        take = max(1, round(fraction * len(idx)))
        held.append(idx[: min(take, len(idx) - 1) if keep_one else take])
    held_out = np.sort(np.concatenate(held))
    keep = np.setdiff1d(np.arange(len(y)), held_out)
    return keep, held_out


def labelled_subset(y: np.ndarray, per_class: int | None, fraction: float | None, seed: int) -> np.ndarray:
    """Seeded, stratified choice of the training indices whose labels may be used (sorted)."""
    if per_class is None and fraction is None:
        return np.arange(len(y))
    rng = np.random.RandomState(seed)
    chosen = []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        take = per_class if per_class is not None else max(1, round(fraction * len(idx)))
        if take > len(idx):
            raise DataError(f"data.labels_per_class={per_class} but class {c} has only {len(idx)} "
                            f"training images; lower it")
        chosen.append(idx[:take])
    return np.sort(np.concatenate(chosen))


def class_mixed(y: np.ndarray, n: int | None = None, seed: int = SPLIT_SEED) -> np.ndarray:
    """`n` indices (all when None) in a seeded random order that deals the classes out in turn: every prefix
    holds each class about equally (folder test sets are sorted by class, so their first images are all one
    class). What pictures show and what `vae eval --limit N` evaluates; the same images whatever the run's seed."""
    rng = np.random.RandomState(seed)
    order = rng.permutation(len(y))
    rank = np.empty(len(y), np.int64)
    for c in np.unique(y):
        mine = order[y[order] == c]
        rank[mine] = np.arange(len(mine))
    # by rank within the class, ties broken by the random order: round after round of one image per class
    pos = np.empty(len(y), np.int64)
    pos[order] = np.arange(len(y))
    mixed = np.lexsort((pos, rank))
    return mixed if n is None else mixed[:n]


def conform(x: np.ndarray, cfg) -> np.ndarray:
    """Apply data.channels (ITU-R 601 luminance, as Pillow's "L"; or grey repeated) and data.image_size."""
    if cfg.channels == 1 and x.shape[1] == 3:
        x = (x * np.array([0.299, 0.587, 0.114], np.float32)[None, :, None, None]).sum(1, keepdims=True)
    elif cfg.channels == 3 and x.shape[1] == 1:
        x = np.repeat(x, 3, axis=1)
    if cfg.image_size is not None and x.shape[2:] != (cfg.image_size, cfg.image_size):
        t = torch.nn.functional.interpolate(torch.from_numpy(np.ascontiguousarray(x)), size=(cfg.image_size,) * 2,
                                            mode="bilinear", antialias=True, align_corners=False)
        x = t.clamp(0, 1).numpy()
    return x


def build_dataset(cfg, seed: int, read_only: bool = False) -> Dataset:
    """The recipe's dataset. `read_only` (commands that only read a model: eval, plot, sample) never
    downloads, whatever `data.download` the weights file's recipe says: a file must not make us write."""
    if read_only and cfg.download:
        cfg = dataclasses.replace(cfg, download=False)
    builder = DATASETS.get(cfg.name)
    train_x, train_y, test_x, test_y, classes = builder(cfg)
    if len(train_x) == 0:
        raise DataError(f"dataset '{cfg.name}' has no training images")
    lazy = is_lazy(train_x)  # a streamed folder dataset: decoded at its size and channels, batch by batch
    if lazy and cfg.binarize != "none":
        raise DataError(f"data.binarize={cfg.binarize} needs the images in memory, but this dataset streams "
                        f"from disk (over data.memory_limit_gb={cfg.memory_limit_gb}); raise that limit or use "
                        f"binarize=none")
    if not lazy:
        train_x, test_x = conform(train_x, cfg), conform(test_x, cfg)
    if cfg.train_limit is not None:
        train_x, train_y = take_rows(train_x, slice(0, cfg.train_limit)), train_y[: cfg.train_limit]
    hold_x = hold_y = None
    if cfg.holdout_fraction > 0:  # fixed like the test split: the same images whatever the seed
        keep, held = stratified_split(train_y, cfg.holdout_fraction, SPLIT_SEED, keep_one=True)
        if len(keep) == 0:
            raise DataError(f"data.holdout_fraction={cfg.holdout_fraction} leaves no training images; lower it")
        hold_x, hold_y = take_rows(train_x, held), train_y[held]
        train_x, train_y = take_rows(train_x, keep), train_y[keep]
    labelled = labelled_subset(train_y, cfg.labels_per_class, cfg.labeled_fraction, seed)
    levels, grey = LEVELS.get(cfg.name, 256), None
    if cfg.binarize != "none":  # fixed draws (seeded apart), so every command sees the same binary images
        grey = train_x if cfg.binarize == "stochastic" else None
        train_x, test_x = _binarize(train_x, cfg.binarize, 1), _binarize(test_x, cfg.binarize, 2)
        hold_x = _binarize(hold_x, cfg.binarize, 3) if hold_x is not None else None
        levels = 2

    def t(a):
        return a if a is None or is_lazy(a) else torch.from_numpy(np.ascontiguousarray(a))

    return Dataset(t(train_x), t(train_y), t(test_x), t(test_y), classes, t(labelled), t(hold_x), t(hold_y),
                   levels, t(grey))


# Pixel values a dataset's images take (8-bit unless listed): the grid of discretised likelihoods.
LEVELS = {"digits": 17}


def take_rows(x, index):
    """Rows of an array, or of a FileImages without decoding them."""
    return x.subset(index) if is_lazy(x) else x[index]


def _binarize(x: np.ndarray, mode: str, seed: int) -> np.ndarray:
    if mode == "threshold":
        return (x > 0.5).astype(np.float32)
    return (np.random.RandomState(seed).random_sample(x.shape) < x).astype(np.float32)

