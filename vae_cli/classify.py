"""Batch classification of image files: decoded in parallel threads (Pillow releases the GIL), converted
exactly as the training data was, predicted in batches. Bad files are collected, not fatal."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from vae_cli.errors import ImageError
from vae_cli.evaluate import predict
from vae_cli.images import load_image


def _load(path: Path, channels: int, size: tuple[int, int]) -> np.ndarray | str:
    try:
        return load_image(path, channels, size)
    except ImageError as e:
        return str(e)


def classify_paths(model, meta: dict, files: list[Path], rt, *, top_k: int = 1,
                   batch_size: int = 256) -> tuple[list[dict], list[str]]:
    """Returns (rows in input order, failure messages). Each row: path and the top-k classes."""
    pre = meta["preprocess"]
    channels, size = pre["channels"], tuple(pre["size"])
    classes = meta["classes"]
    k = min(top_k, len(classes))
    rows, failures = [], []
    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        for start in range(0, len(files), batch_size):
            chunk = files[start:start + batch_size]
            loaded = list(pool.map(lambda p: _load(p, channels, size), chunk))
            good = [(p, a) for p, a in zip(chunk, loaded) if not isinstance(a, str)]
            failures += [a for a in loaded if isinstance(a, str)]
            if not good:
                continue
            x = torch.from_numpy(np.stack([a for _, a in good]))
            probs = predict(model, x, rt, batch_size)
            top_p, top_i = probs.topk(k, dim=1)
            for (p, _), ps, idx in zip(good, top_p.tolist(), top_i.tolist()):
                rows.append({"path": str(p), "top": [{"class": classes[i], "prob": q} for q, i in zip(ps, idx)]})
    return rows, failures
