"""scikit-learn's embedded 8x8 digits: the demo's dataset, available with no download."""

from __future__ import annotations

import numpy as np

from vae_cli.data.base import SPLIT_SEED, register_dataset, stratified_split


@register_dataset("digits")
def _digits(cfg) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """scikit-learn's embedded 8x8 digits (1,797 images, 17 grey levels), split by test_fraction."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    y = d.target.astype(np.int64)
    train, test = stratified_split(y, cfg.test_fraction, SPLIT_SEED)
    return x[train], y[train], x[test], y[test], [str(c) for c in range(10)]
