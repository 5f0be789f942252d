"""Write held-back digits as PNG files, <out>/<label>/<index>.png, for trying `vae classify` on real files.

    python scripts/export_digits.py runs/digits/images --count 50
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

from vae_cli.data import SPLIT_SEED, stratified_split


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--count", type=int, default=50)
    ap.add_argument("--scale", type=int, default=4, help="enlarge each 8x8 digit by this factor")
    args = ap.parse_args()
    d = load_digits()
    _, test = stratified_split(d.target, 0.2, SPLIT_SEED)  # the demo recipe's held-back split
    for i in test[: args.count]:
        img = (d.images[i] / 16.0 * 255).round().astype(np.uint8)
        img = img.repeat(args.scale, 0).repeat(args.scale, 1)
        path = args.out / str(d.target[i]) / f"{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(path)
    print(args.out)


if __name__ == "__main__":
    main()
