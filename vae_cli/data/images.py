"""Reading image files into tensors the way the training data was prepared: one function for both, so
`classify` sees exactly what training saw. Pillow does the decoding; errors name the file.
"""

from __future__ import annotations

import glob
import os
import stat
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from vae_cli.core.errors import ImageError, UsageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
MAX_PIXELS = 64_000_000  # refuse decompression bombs with a clear line, not a crash

_limits_lock = threading.Lock()
_limits: dict = {"depth": 0, "saved": None}


@contextmanager
def pillow_limits():
    """Pillow's decompression-bomb limit, raised to twice ours (it warns above its limit and refuses above
    twice it; we refuse at MAX_PIXELS first, from the header) only while this tool decodes, and restored
    after, so a program that imports vae_cli keeps its own Pillow settings. Nested and threaded uses count
    depth, so the last one out restores it."""
    with _limits_lock:
        if _limits["depth"] == 0:
            _limits["saved"] = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = 2 * MAX_PIXELS
        _limits["depth"] += 1
    try:
        yield
    finally:
        with _limits_lock:
            _limits["depth"] -= 1
            if _limits["depth"] == 0:
                Image.MAX_IMAGE_PIXELS = _limits["saved"]


def to_mode(img: Image.Image, channels: int) -> Image.Image:
    """Grey (1) or RGB (3), whatever the file held: palette, alpha, CMYK, 16-bit."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grey: scale to 8 bits, don't clip
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0, 0, 255).astype(np.uint8), mode="L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8))
    return img.convert("L" if channels == 1 else "RGB")


def resize(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize to (H, W): area averaging when shrinking (how the 8x8 digits were made), bicubic up."""
    h, w = size
    if img.size == (w, h):
        return img
    shrinking = img.size[0] >= w and img.size[1] >= h
    return img.resize((w, h), Image.Resampling.BOX if shrinking else Image.Resampling.BICUBIC)


def check_regular(path: str | Path) -> None:
    """Refuse what is not a regular file before opening it: a FIFO named like an image would block the
    open forever, a device would stream without end."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise ImageError(f"image '{path}' not found") from None
    except OSError as e:
        raise ImageError(f"image '{path}' cannot be read ({e.strerror or e})") from None
    if stat.S_ISDIR(mode):
        raise ImageError(f"'{path}' is a folder, not an image")
    if not stat.S_ISREG(mode):
        raise ImageError(f"'{path}' is not a regular file (a FIFO, socket or device); give image files")


def load_image(path: str | Path, channels: int, size: tuple[int, int]) -> np.ndarray:
    """One image file -> float32 array (C, H, W) in [0, 1]. Raises ImageError naming the file."""
    path = Path(path)
    check_regular(path)
    try:
        with pillow_limits(), Image.open(path) as img:
            if img.width * img.height > MAX_PIXELS:  # checked from the header, before decoding anything
                raise Image.DecompressionBombError(path)
            img.seek(0)  # animated GIF/PNG/WebP: the first frame
            img.load()
            img = resize(to_mode(img, channels), size)
    except FileNotFoundError:
        raise ImageError(f"image '{path}' not found") from None
    except IsADirectoryError:
        raise ImageError(f"'{path}' is a folder, not an image") from None
    except Image.DecompressionBombError:
        raise ImageError(f"image '{path}' is too large (over {MAX_PIXELS:,} pixels); shrink it first") from None
    except UnidentifiedImageError:
        raise ImageError(f"'{path}' is not an image Pillow can read (PNG, JPEG, BMP, GIF, WebP, TIFF)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"image '{path}' is damaged or truncated ({e}); re-export it") from None
    arr = np.asarray(img, dtype=np.float32) / 255.0
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def expand_paths(items: list[str]) -> list[Path]:
    """Files, folders (searched recursively for images) and globs -> sorted, de-duplicated image paths."""
    found: list[Path] = []
    for item in items:
        if any(ch in item for ch in "*?[") and not os.path.lexists(item):  # a real `a[1].png` is a file
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                raise UsageError(f"pattern '{item}' matches no files")
            found += [Path(m) for m in matches if os.path.isfile(m)]
        elif os.path.isdir(item):
            hits = sorted(p for p in Path(item).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS
                          and p.is_file())
            if not hits:
                raise UsageError(f"folder '{item}' holds no images ({', '.join(IMAGE_EXTENSIONS)})")
            found += hits
        elif os.path.exists(item):
            found.append(Path(item))
        else:
            raise UsageError(f"'{item}' does not exist (give image files, folders or globs)")
    seen: set[Path] = set()
    return [p for p in found if not (p in seen or seen.add(p))]


def as_trained(arr: np.ndarray, preprocess: dict) -> np.ndarray:
    """A loaded image as the model saw its training data: thresholded when that was binarised."""
    return (arr > 0.5).astype(np.float32) if preprocess.get("binarize") else arr


def load_for_model(paths: list[Path], meta: dict):
    """Image files -> one (N, C, H, W) float tensor in the model's input format (ImageError if one is bad)."""
    import torch

    c, h, w = meta["image_shape"]
    pre = meta.get("preprocess", {})
    return torch.stack([torch.from_numpy(as_trained(load_image(p, c, (h, w)), pre)) for p in paths])
