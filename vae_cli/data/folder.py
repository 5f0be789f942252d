"""The user's own images: `root/<class>/*.png|jpg` (torchvision ImageFolder layout).

`root/train/<class>/` with `root/test/<class>/` (or `root/val/<class>/`) gives the splits; otherwise the
classes sit directly under `root` (or only `root/train` exists) and `data.test_fraction` of each class is
held out with a fixed seed. Any size, grey or colour: every file goes through `images.load_image`, the
same function `vae classify` uses, at `data.image_size` (default 32) and `data.channels` (default: 3 when
any sampled file is colour, else 1). Files are decoded once, in parallel threads.
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from vae_cli.core import cpu
from vae_cli.core.errors import DataError, ImageError
from vae_cli.data.base import SPLIT_SEED, register_dataset, stratified_split, take_rows
from vae_cli.data.images import check_regular, load_image

DEFAULT_SIZE = 32
GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}


def _scan(folder: Path) -> tuple[list[tuple[str, int]], list[str]]:
    from torchvision.datasets import ImageFolder

    try:
        ds = ImageFolder(str(folder), loader=lambda p: p)  # scans names only; we decode ourselves
    except FileNotFoundError as e:
        msg = str(e)
        if "no valid file" in msg.lower():
            raise DataError(f"{msg.split('.')[0]} in '{folder}': every class folder needs at least one "
                            f"image (.png, .jpg, ...); remove empty folders") from None
        raise DataError(f"no class folders in '{folder}': put images in {folder}/<class>/*.png") from None
    return ds.samples, ds.classes


def _channels(paths: list[str]) -> int:
    for p in paths[:64]:
        try:
            check_regular(p)  # a FIFO among the files must not block this peek
            with Image.open(p) as im:
                if im.mode not in GREY_MODES:
                    return 3
        except (OSError, ImageError):
            continue  # decoding below names the bad file
    return 1


def _decode(samples: list[tuple[str, int]], channels: int, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    def one(path: str) -> np.ndarray:
        try:
            return load_image(path, channels, size)
        except ImageError as e:
            raise DataError(f"{e} (found while loading the folder dataset; remove or replace the file)") from None

    with ThreadPoolExecutor(cpu.current().decode_threads) as pool:
        x = list(pool.map(one, [p for p, _ in samples]))
    return np.stack(x).astype(np.float32), np.array([c for _, c in samples], dtype=np.int64)


def _files(samples: list[tuple[str, int]], channels: int, size: tuple[int, int], workers: int):
    """Like _decode, but the images stay on disk: a FileImages decoded batch by batch while training."""
    from vae_cli.data.streaming import FileImages

    return (FileImages([p for p, _ in samples], channels, size, workers),
            np.array([c for _, c in samples], dtype=np.int64))


@register_dataset("folder")
def build_folder(cfg):
    """Images in class folders under data.root (train/ and test/ or val/ subfolders, or one tree)."""
    root = Path(os.path.expanduser(cfg.root))
    if not root.is_dir():
        raise DataError(f"data.root '{root}' is not a folder; point it at a folder of class subfolders "
                        f"(root/<class>/*.png) or of train/ and test/ folders")
    train_dir = root / "train" if (root / "train").is_dir() else root
    test_dir = next((root / s for s in ("test", "val") if (root / s).is_dir()), None)
    train_samples, classes = _scan(train_dir)
    test_samples: list[tuple[str, int]] = []
    if test_dir is not None:
        test_samples, test_classes = _scan(test_dir)
        if test_classes != classes:
            raise DataError(f"class folders differ between '{train_dir}' ({', '.join(classes)}) and "
                            f"'{test_dir}' ({', '.join(test_classes)}); make them match")
    size = (cfg.image_size or DEFAULT_SIZE,) * 2
    channels = cfg.channels or _channels([p for p, _ in train_samples + test_samples])
    decoded_gb = (len(train_samples) + len(test_samples)) * channels * size[0] * size[1] * 4 / 2**30
    load = _decode
    if decoded_gb > cfg.memory_limit_gb:
        # on 2 cores, 1 worker measured 1,414 images/s and 2 workers 1,371: the workers take training's cores
        workers = cfg.workers if cfg.workers is not None else cpu.current().loader_workers
        load = functools.partial(_files, workers=workers)
    x, y = load(train_samples, channels, size)
    if test_dir is None:
        keep, held = stratified_split(y, cfg.test_fraction, SPLIT_SEED)
        return take_rows(x, keep), y[keep], take_rows(x, held), y[held], classes
    tx, ty = load(test_samples, channels, size)
    return x, y, tx, ty, classes
