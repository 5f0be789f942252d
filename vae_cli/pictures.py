"""PNG pictures: sample grids and reconstructions, written atomically."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vae_cli.fsutil import write_with


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
    """Small images (8x8 digits) are enlarged by whole pixels so a person can see them."""
    return max(1, 32 // max(image_shape[1:]))


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
