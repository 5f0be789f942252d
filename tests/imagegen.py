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


def noise(size: tuple[int, int], seed: int = 0) -> np.ndarray:
    """Uniform grey noise (h, w) uint8: nothing like any training image."""
    return np.random.RandomState(seed).randint(0, 256, size).astype(np.uint8)


LETTERS = "AKMWHRE"
SHAPES = ("square", "bars", "checker", "frame", "diagonals")


def letter(char: str, size: tuple[int, int]) -> np.ndarray:
    """A white capital letter on black (h, w) uint8, drawn at 64x64 with Pillow's own font, then resized."""
    from PIL import ImageDraw, ImageFont

    img = Image.new("L", (64, 64), 0)
    font = ImageFont.load_default(size=56)
    ImageDraw.Draw(img).text((32, 32), char, fill=255, font=font, anchor="mm", stroke_width=5, stroke_fill=255)
    return np.asarray(img.resize(size[::-1], Image.BILINEAR))


def shape(kind: str, size: tuple[int, int]) -> np.ndarray:
    """A white geometric pattern on black (h, w) uint8."""
    from PIL import ImageDraw

    img = Image.new("L", (64, 64), 0)
    d = ImageDraw.Draw(img)
    if kind == "square":
        d.rectangle((10, 10, 54, 54), fill=255)
    elif kind == "bars":
        for y in range(4, 64, 16):
            d.rectangle((0, y, 63, y + 7), fill=255)
    elif kind == "checker":
        for i in range(4):
            for j in range(4):
                if (i + j) % 2 == 0:
                    d.rectangle((16 * i, 16 * j, 16 * i + 15, 16 * j + 15), fill=255)
    elif kind == "frame":
        d.rectangle((2, 2, 61, 61), outline=255, width=8)
    else:
        d.line((0, 0, 63, 63), fill=255, width=8)
        d.line((0, 63, 63, 0), fill=255, width=8)
    return np.asarray(img.resize(size[::-1], Image.BILINEAR))


def outliers(folder: Path, size: tuple[int, int], count: int = 10) -> dict[str, list[Path]]:
    """PNG files of noise, letters and shapes in folder/{noise,letters,shapes}/."""
    made: dict[str, list[Path]] = {"noise": [], "letters": [], "shapes": []}
    for kind, arrays in (("noise", [noise(size, s) for s in range(count)]),
                         ("letters", [letter(c, size) for c in LETTERS]),
                         ("shapes", [shape(k, size) for k in SHAPES])):
        (folder / kind).mkdir(parents=True, exist_ok=True)
        for i, a in enumerate(arrays):
            p = folder / kind / f"{kind}-{i:03d}.png"
            Image.fromarray(a, "L").save(p)
            made[kind].append(p)
    return made


def colour_scene(cls: int, size: tuple[int, int], seed: int = 0) -> np.ndarray:
    """A small colour 'photo' (h, w, 3) uint8 whose class shows in colour and shape, with random position,
    scale, background and noise: class 0 a red disc on a blue-grey ground, 1 a green bar on a sandy ground,
    2 a dark diagonal band on a light purple ground."""
    rng = np.random.RandomState(seed * 7 + cls)
    h, w = size[1], size[0]
    yy, xx = np.mgrid[0:h, 0:w] / np.array([h, w]).reshape(2, 1, 1)[:, :, :]
    grounds = [(90, 110, 150), (200, 180, 120), (190, 160, 210)]
    img = np.empty((h, w, 3), np.float32)
    img[:] = np.array(grounds[cls]) + rng.uniform(-25, 25, 3)
    cy, cx, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.15, 0.3)
    if cls == 0:
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2
        colour = (220, 40, 40)
    elif cls == 1:
        mask = np.abs(xx - cx) < r / 2
        colour = (40, 200, 60)
    else:
        mask = np.abs((yy - cy) - (xx - cx)) < r / 2
        colour = (40, 30, 60)
    img[mask] = np.array(colour) + rng.uniform(-20, 20, 3)
    img += rng.normal(0, 8, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def photo_folder(root: Path, per_class: int, split: str, seed: int = 0) -> list[Path]:
    """root/split/<class>/ files of 3 classes in the shapes users bring: 64, 96 and 128 px, other aspect
    ratios, JPEG and PNG, RGB, palette, RGBA, CMYK and grey-with-alpha."""
    sizes = [(64, 64), (96, 96), (128, 128), (80, 60), (50, 90)]
    modes = ["RGB", "RGB", "P", "RGBA", "CMYK"]
    written = []
    for cls, name in enumerate(["disc", "bar", "band"]):
        for i in range(per_class):
            k = seed * 1000 + i
            img = Image.fromarray(colour_scene(cls, sizes[k % len(sizes)], k), "RGB").convert(modes[k % len(modes)])
            suffix = ".jpg" if img.mode in ("RGB", "CMYK") and k % 2 == 0 else ".png"
            if suffix == ".png" and img.mode == "CMYK":
                img = img.convert("RGB")
            path = root / split / name / f"{i:03d}{suffix}"
            path.parent.mkdir(parents=True, exist_ok=True)
            img.save(path)
            written.append(path)
    return written
