"""Real image files written by the tests: PNG and JPEG, grey and colour, odd sizes, odd modes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def digit_like(size: tuple[int, int], seed: int = 0) -> np.ndarray:
    """A white stroke on black, like the digits (h, w) uint8."""
    rng = np.random.RandomState(seed)
    h, w = size
    img = np.zeros((h, w), np.uint8)
    img[h // 5: 4 * h // 5, w // 2 - max(1, w // 10): w // 2 + max(1, w // 10)] = 255
    return np.clip(img.astype(int) + rng.randint(0, 30, (h, w)), 0, 255).astype(np.uint8)


def write(path: Path, mode: str, size: tuple[int, int], seed: int = 0) -> Path:
    """Write an image in one of: L, RGB, RGBA, P, I;16, CMYK, LA (format from the suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    grey = digit_like(size, seed)
    img = Image.fromarray(grey, "L")
    if mode == "I;16":
        img = Image.fromarray(grey.astype(np.uint16) * 257)
    elif mode != "L":
        img = img.convert(mode)
    img.save(path)
    return path
