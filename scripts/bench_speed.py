"""Speed benchmark on full MNIST: `make bench-speed`.

Reports, on this machine:
  1. training images/s and projected epoch time of recipes/mnist.yaml for fp32 and bf16, without and with
     train.compile (two epochs on --images training images; the second epoch is the steady speed, the
     first minus the second is the compile cost), with the test accuracy each reached;
  2. the same network trained by pythae 0.1.2 (the library a user would pick instead) against `vae` on
     the same images and batch size, and the ratio; pythae lives in its own venv (--pythae-python), never
     in vae's dependencies;
  3. `vae classify` images/s on a folder of 10,000 PNG files (MNIST test images);
  4. `vae --help` wall time.
Results go to stdout and bench-out/speed.json.

    python scripts/bench_speed.py [--images 12000] [--pythae-python bench-venv/bin/python] [--skip-compile]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_accuracy import ROOT, mnist_root  # noqa: E402

VAE = [sys.executable, "-m", "vae_cli"]


def train_speed(recipe: str, out: Path, data_root: Path, images: int, tag: str, extra: list[str]) -> dict:
    """Two epochs on `images` images; speed from the second epoch (the first includes any compile)."""
    cmd = [*VAE, "train", recipe, f"data.root={data_root}", f"data.train_limit={images}", "epochs=2",
           "--out", str(out / "runs"), "--name", f"speed-{tag}", "--exist-ok", "--json", "--quiet", *extra]
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        sys.exit(f"error: {tag} failed ({proc.returncode})")
    res = json.loads(proc.stdout)
    rows = list(csv.DictReader(open(res["paths"]["metrics"])))
    first, second = float(rows[0]["seconds"]), float(rows[1]["seconds"])
    return {"tag": tag, "images": images, "images_per_s": round(images / second, 1),
            "epoch_seconds_60k": round(60000 / (images / second), 1), "first_epoch_extra_s": round(first - second, 1),
            "test_accuracy": res["test"]["accuracy"], "test_elbo": round(res["test"]["elbo"], 3),
            "precision": res["precision"]}


def export_pngs(data_root: Path, folder: Path, count: int) -> Path:
    if folder.is_dir() and len(list(folder.rglob("*.png"))) >= count:
        return folder
    from PIL import Image

    from vae_cli.core.recipe import DataConfig
    from vae_cli.data import build_dataset

    d = build_dataset(DataConfig(name="mnist", root=str(data_root)), 0)
    for i in range(count):
        path = folder / str(int(d.test_y[i])) / f"{i:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((d.test_x[i, 0].numpy() * 255).round().astype(np.uint8)).save(path)
    return folder


def folder_speed(data_root: Path, out: Path) -> list[dict]:
    """5. A folder dataset (the 10,000 MNIST test PNGs): decoded into memory against streamed from disk
    by DataLoader workers, the plain VAE of recipes/mnist-vae.yaml, 7,000 training images per epoch."""
    folder = export_pngs(data_root, out / "pngs", 10000)
    common = ["data.name=folder", "data.image_size=28", "data.channels=1", "data.binarize=none",
              "data.holdout_fraction=0"]
    runs = [train_speed("recipes/mnist-vae.yaml", out, folder, 7000, "folder-memory",
                        [*common, "data.memory_limit_gb=100"])]
    for workers in (1, 2):
        runs.append(train_speed("recipes/mnist-vae.yaml", out, folder, 7000, f"folder-stream-{workers}w",
                                [*common, "data.memory_limit_gb=0", f"data.workers={workers}"]))
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description="MNIST speed benchmark")
    ap.add_argument("--mnist", type=Path, default=ROOT.parent / "shared" / "data" / "mnist")
    ap.add_argument("--out", type=Path, default=ROOT / "bench-out")
    ap.add_argument("--images", type=int, default=12000, help="training images per timed epoch")
    ap.add_argument("--pythae-python", type=Path, default=ROOT / "bench-venv" / "bin" / "python")
    ap.add_argument("--skip-compile", action="store_true")
    ap.add_argument("--only-folder", action="store_true", help="only section 5 (folder: memory vs streamed)")
    ap.add_argument("--only-same-network", action="store_true", help="only section 2 (vae against pythae)")
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"],
                    help="precisions to time (bf16 is slow on CPUs without native bf16: leave it out there)")
    args = ap.parse_args()
    data_root = mnist_root(args.mnist, args.out)
    report: dict = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                    "date": time.strftime("%Y-%m-%d"), "images": args.images}

    if args.only_folder:
        report["folder"] = folder_speed(data_root, args.out)
        print(json.dumps(report, indent=2))
        return
    # 1. the default MNIST recipe, per precision, with and without compile
    runs = []
    for precision in ([] if args.only_same_network else args.precisions):
        for compiled in ((False,) if args.skip_compile else (False, True)):
            tag = f"mnist-{precision}{'-compile' if compiled else ''}"
            runs.append(train_speed("recipes/mnist.yaml", args.out, data_root, args.images, tag,
                                    ["--precision", precision, f"train.compile={str(compiled).lower()}"]))
    report["recipe_mnist"] = runs

    # 2. the same plain VAE network in vae and in pythae
    same = ["model.name=vae", "model.backbone=small", "model.decoder=small", "model.latent_dim=16",
            "model.width=32", "model.hidden=256", "model.likelihood=bernoulli", "train.batch_size=64",
            "train.lr=0.001", "train.head_steps=0", "train.augment_shift=0", "train.kl_warmup_epochs=0"]
    ours = [train_speed("recipes/mnist.yaml", args.out, data_root, args.images, f"vae-{p}", ["--precision", p, *same])
            for p in args.precisions]
    report["same_network_vae"] = ours
    if args.pythae_python.is_file():
        from vae_cli.core.recipe import DataConfig
        from vae_cli.data import build_dataset

        d = build_dataset(DataConfig(name="mnist", root=str(data_root), train_limit=args.images), 0)
        npz = args.out / f"mnist-{args.images}.npz"
        np.savez(npz, train_x=d.train_x.numpy(), test_x=d.test_x.numpy())
        cmd = [str(args.pythae_python), "scripts/pythae_speed.py", str(npz), "--batch-size", "64", "--lr", "0.001"]
        print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        pythae = json.loads(proc.stdout.strip().splitlines()[-1])
        report["same_network_pythae"] = pythae
        report["ratio_vs_pythae"] = {r["tag"]: round(r["images_per_s"] / pythae["images_per_s"], 2) for r in ours}
    else:
        print(f"pythae venv not found at {args.pythae_python}: skipped (make bench-speed creates it)", file=sys.stderr)
    if args.only_same_network:
        print(json.dumps(report, indent=2))
        return

    # 3. classify throughput on 10,000 PNG files
    folder = export_pngs(data_root, args.out / "pngs", 10000)
    weights = args.out / "runs" / f"speed-mnist-{args.precisions[-1]}" / "model.safetensors"
    t0 = time.perf_counter()
    proc = subprocess.run([*VAE, "classify", str(weights), str(folder), "--format", "csv"], cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    wall = time.perf_counter() - t0
    rows = list(csv.reader(proc.stdout.splitlines()))[1:]
    right = sum(Path(r[0]).parent.name == r[1].split(" ")[0] for r in rows)
    report["classify"] = {"files": len(rows), "wall_s": round(wall, 2), "images_per_s": round(len(rows) / wall, 1),
                          "accuracy_on_files": round(right / max(1, len(rows)), 4)}

    # 4. vae --help
    times = []
    for _ in range(7):
        t0 = time.perf_counter()
        subprocess.run([str(Path(sys.executable).parent / "vae"), "--help"], stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - t0)
    report["help_seconds_median"] = round(statistics.median(times), 3)

    report["folder"] = folder_speed(data_root, args.out)
    (args.out / "speed.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
