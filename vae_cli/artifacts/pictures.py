"""PNG pictures: sample grids and reconstructions, written atomically."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vae_cli.core.fsutil import write_with


def grid(images: torch.Tensor, nrow: int | None = None, pad: int = 1, upscale: int = 1) -> np.ndarray:
    """(N, C, H, W) in [0, 1] -> one uint8 image (H', W') or (H', W', 3), rows of `nrow` tiles."""
    from torchvision.utils import make_grid

    n = images.shape[0]
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    g = make_grid(images.detach().float().cpu().clamp(0, 1), nrow=nrow, padding=pad, pad_value=0.5)
    arr = (g.permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)
    if images.shape[1] == 1:
        arr = arr[..., 0]
    if upscale > 1:
        arr = arr.repeat(upscale, 0).repeat(upscale, 1)
    return arr


def auto_upscale(image_shape: tuple[int, ...]) -> int:
    """Small images are enlarged by whole pixels so a person can see them: tiles of about 96 pixels (a 32x32
    photo 3x, an 8x8 digit 12x)."""
    return max(1, 96 // max(image_shape[1:]))


def save_png(arr: np.ndarray, path: str | Path) -> Path:
    path = Path(path)
    write_with(path, lambda tmp: Image.fromarray(arr).save(tmp, format="PNG"))
    return path


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None) -> Path:
    return save_png(grid(images, nrow, upscale=auto_upscale(tuple(images.shape[1:]))), path)


def save_each(images: torch.Tensor, folder: str | Path, prefix: str = "sample") -> list[Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return [save_png(grid(img[None], 1, pad=0), folder / f"{prefix}-{i:04d}.png") for i, img in enumerate(images)]


@torch.no_grad()
def class_samples(model, per_class: int, temperature: float = 1.0) -> torch.Tensor:
    """per_class samples of every class, class by class (one grid row per class with nrow=per_class)."""
    y = torch.arange(model.num_classes, device=model.device).repeat_interleave(per_class)
    return model.sample(len(y), y, temperature).float().cpu()


@torch.no_grad()
def interpolation(model, xa: torch.Tensor, xb: torch.Tensor, steps: int) -> torch.Tensor:
    """Rows of [a, steps decoded codes on the line from z(a) to z(b), b] for each pair (a, b).

    The codes are the posterior means; models whose decoder also takes a class (M2) get the two images'
    class probabilities mixed the same way, so a 3 turns into an 8 along the row."""
    t = torch.linspace(0.0, 1.0, steps, device=xa.device)[None, :, None]
    za, zb = model.latent_means(xa).float(), model.latent_means(xb).float()
    pa, pb = model.predict_proba(xa).float(), model.predict_proba(xb).float()
    z = ((1 - t) * za[:, None] + t * zb[:, None]).flatten(0, 1)
    p = ((1 - t) * pa[:, None] + t * pb[:, None]).flatten(0, 1)
    mid = model.decode_latents(z, p).float().view(len(xa), steps, *xa.shape[1:])
    return torch.cat([xa.float()[:, None], mid, xb.float()[:, None]], 1).flatten(0, 1).cpu()


def pair_indices(y: torch.Tensor, pairs: int) -> tuple[list[int], list[int]]:
    """Pairs of test images from different classes (class c with class c+1), deterministic."""
    classes = sorted(set(y.tolist()))
    first = {c: int((y == c).nonzero()[0]) for c in classes}
    a = [first[classes[i % len(classes)]] for i in range(pairs)]
    b = [first[classes[(i + 1) % len(classes)]] for i in range(pairs)]
    return a, b
