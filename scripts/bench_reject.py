"""Rejection on colour photos: `make bench-reject`.

A CIFAR-10 model (default: the one `make bench-cifar` trained) judges CIFAR-10 test images
(in-distribution) against outlier sets drawn here as 32x32 RGB PNG files, 500 each (seeded):

  uniform-noise     uniform RGB noise
  gaussian-noise    per-value Gaussian noise around a random colour (sd 0.2)
  constant          one random colour
  gradient          a smooth linear ramp between two random colours at a random angle
  mnist-colour      MNIST test digits (../shared/data/mnist), grey replicated to RGB, 28 -> 32 px
  fashion-style     Fashion-MNIST-like garment silhouettes (shirt, trousers, dress, shoe, bag) in textured
                    grey on black, 28 -> 32 px, drawn here (Fashion-MNIST itself is not on this machine)
  cifar-vflip       CIFAR-10 test images upside down (a hard set: the same statistics, only the layout)
  cifar-inverted    CIFAR-10 test images with colours inverted (255 - x)
  synthetic-scenes  1-3 coloured shapes and a few letters on a plain background

It runs `vae eval WEIGHTS --ood SET ...` and prints AUROC per set and score, and the false-reject rate of
each score on the in-distribution images at the calibrated threshold. Results go to bench-out/reject.json.

    python scripts/bench_reject.py [--weights W] [--limit 2000] [--count 500]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
MNIST = ROOT.parent / "shared" / "data" / "mnist" / "t10k-images-idx3-ubyte.gz"
SIZE = 32


def _rgb(a: np.ndarray) -> np.ndarray:
    return np.clip(a, 0, 255).astype(np.uint8)


def uniform_noise(rng):
    return rng.randint(0, 256, (SIZE, SIZE, 3)).astype(np.uint8)


def gaussian_noise(rng):
    return _rgb((rng.uniform(0.2, 0.8, 3) + rng.normal(0, 0.2, (SIZE, SIZE, 3))) * 255)


def constant(rng):
    return _rgb(np.broadcast_to(rng.randint(0, 256, 3), (SIZE, SIZE, 3)))


def gradient(rng):
    a, b = rng.randint(0, 256, 3), rng.randint(0, 256, 3)
    t = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / (SIZE - 1)
    ramp = (np.cos(t) * xx + np.sin(t) * yy)
    ramp = (ramp - ramp.min()) / max(ramp.max() - ramp.min(), 1e-6)
    return _rgb(a + (b - a) * ramp[..., None])


def _grey_to_colour(g: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(g, "L").resize((SIZE, SIZE), Image.BILINEAR).convert("RGB"))


def mnist_colour(count: int, rng) -> list[np.ndarray]:
    if not MNIST.is_file():
        return []
    with gzip.open(MNIST) as f:
        raw = f.read()
    n, h, w = (int.from_bytes(raw[i:i + 4], "big") for i in (4, 8, 12))
    imgs = np.frombuffer(raw, np.uint8, offset=16).reshape(n, h, w)
    return [_grey_to_colour(imgs[i]) for i in rng.choice(n, count, replace=False)]


def garment(rng) -> np.ndarray:
    img = Image.new("L", (28, 28), 0)
    d = ImageDraw.Draw(img)
    grey = int(rng.randint(90, 230))
    kind = rng.randint(5)
    j = lambda v: int(v + rng.randint(-2, 3))  # noqa: E731
    if kind == 0:  # shirt: body and sleeves
        d.polygon([(j(4), j(8)), (j(9), j(3)), (j(19), j(3)), (j(24), j(8)), (j(21), j(12)), (j(19), j(10)),
                   (j(19), j(26)), (j(9), j(26)), (j(9), j(10)), (j(7), j(12))], fill=grey)
    elif kind == 1:  # trousers: two legs
        d.polygon([(j(8), j(2)), (j(20), j(2)), (j(21), j(26)), (j(16), j(26)), (j(14), j(9)), (j(12), j(26)),
                   (j(7), j(26))], fill=grey)
    elif kind == 2:  # dress: a trapezoid
        d.polygon([(j(11), j(2)), (j(17), j(2)), (j(23), j(26)), (j(5), j(26))], fill=grey)
    elif kind == 3:  # shoe: sole and upper
        d.rectangle([j(3), j(18), j(25), j(22)], fill=grey)
        d.ellipse([j(3), j(9), j(17), j(21)], fill=grey)
    else:  # bag: body and handle
        d.rectangle([j(5), j(10), j(23), j(25)], fill=grey)
        d.arc([j(9), j(3), j(19), j(15)], 180, 360, fill=grey, width=2)
    a = np.asarray(img).astype(np.float32)
    a = np.where(a > 0, a + rng.normal(0, 18, a.shape), 0)  # fabric texture
    return _grey_to_colour(_rgb(a))


def scene(rng) -> np.ndarray:
    img = Image.new("RGB", (SIZE, SIZE), tuple(int(v) for v in rng.randint(0, 256, 3)))
    d = ImageDraw.Draw(img)
    for _ in range(rng.randint(1, 4)):
        x0, y0 = rng.randint(0, 24, 2)
        x1, y1 = x0 + rng.randint(5, 16), y0 + rng.randint(5, 16)
        fill = tuple(int(v) for v in rng.randint(0, 256, 3))
        [d.rectangle, d.ellipse][rng.randint(2)]([int(x0), int(y0), int(x1), int(y1)], fill=fill)
    text = "".join(chr(65 + int(c)) for c in rng.randint(0, 26, rng.randint(1, 5)))
    d.text((int(rng.randint(0, 12)), int(rng.randint(0, 20))), text, fill=tuple(int(v) for v in rng.randint(0, 256, 3)))
    return np.asarray(img)


def cifar_files(root: Path, count: int, rng) -> list[Path]:
    files = sorted(p for p in (root / "test").rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    return [files[i] for i in rng.choice(len(files), min(count, len(files)), replace=False)]


def make_sets(out: Path, count: int, cifar: Path | None) -> dict[str, Path]:
    makers = {"uniform-noise": uniform_noise, "gaussian-noise": gaussian_noise, "constant": constant,
              "gradient": gradient, "fashion-style": garment, "synthetic-scenes": scene}
    sets: dict[str, list[np.ndarray]] = {}
    for i, (name, fn) in enumerate(makers.items()):
        rng = np.random.RandomState(100 + i)
        sets[name] = [fn(rng) for _ in range(count)]
    sets["mnist-colour"] = mnist_colour(count, np.random.RandomState(1))
    if cifar is not None:
        picked = [np.asarray(Image.open(p).convert("RGB")) for p in cifar_files(cifar, count, np.random.RandomState(2))]
        sets["cifar-vflip"] = [a[::-1] for a in picked]
        sets["cifar-inverted"] = [255 - a for a in picked]
    folders = {}
    for name, arrays in sets.items():
        if not arrays:
            print(f"skipping {name}: its source is missing", file=sys.stderr)
            continue
        folder = out / "ood" / name
        folder.mkdir(parents=True, exist_ok=True)
        for j, a in enumerate(arrays):
            Image.fromarray(np.ascontiguousarray(a), "RGB").save(folder / f"{j:04d}.png")
        folders[name] = folder
    return folders


def main() -> None:
    ap = argparse.ArgumentParser(description="--reject on colour photos: AUROC per outlier set and score")
    ap.add_argument("--weights", type=Path, default=ROOT / "bench-out" / "runs" / "cifar10-4000-labels-seed0" /
                    "model.safetensors", help="a CIFAR-10 model (default: the one make bench-cifar trains)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench-out")
    ap.add_argument("--limit", type=int, default=10000, help="CIFAR-10 test images scored (first N)")
    ap.add_argument("--count", type=int, default=500, help="images per outlier set")
    args = ap.parse_args()
    if not args.weights.is_file():
        sys.exit(f"error: {args.weights} is missing; run `make bench-cifar` first or pass --weights")
    from safetensors import safe_open

    with safe_open(str(args.weights), "numpy") as f:
        recipe = json.loads(f.metadata()["recipe"])
    cifar = Path(recipe["data"]["root"])
    folders = make_sets(args.out, args.count, cifar if (cifar / "test").is_dir() else None)
    cmd = [sys.executable, "-m", "vae_cli", "eval", str(args.weights), "--iw-samples", "0", "--limit",
           str(args.limit), "--json", "--quiet"] + [a for f in folders.values() for a in ("--ood", str(f))]
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        sys.exit(f"error: vae eval failed with exit code {proc.returncode}")
    res = json.loads(proc.stdout)
    ood = res["ood"]
    names = list(ood["false_reject_rate"])
    lines = [f"in-distribution: {ood['in_images']} CIFAR-10 test images; threshold at {ood['rate']:.1%} of "
             f"held-out training images; default score: {ood['score']}",
             "set".ljust(18) + "".join(n.rjust(12) for n in names)]
    for label, folder in folders.items():
        s = ood["sets"][str(folder)]["scores"]
        lines.append(label.ljust(18) + "".join(f"{s[n]['auroc']:12.4f}" for n in names))
    lines.append("false rejects".ljust(18) + "".join(f"{ood['false_reject_rate'][n]:12.2%}" for n in names))
    lines.append(f"test accuracy on those images {res['accuracy']:.4f}; {time.perf_counter() - t0:.0f} s")
    report = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d"),
              "weights": str(args.weights), "command": " ".join(cmd), "ood": ood, "summary": lines}
    (args.out / "reject.json").write_text(json.dumps(report, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
