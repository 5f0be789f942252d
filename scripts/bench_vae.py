"""Generative benchmark on CIFAR-10 as JPEG class folders: `make bench-vae`.

Trains recipes/cifar10-vae.yaml (the hierarchical VAE, unsupervised, a 55-minute budget) as a real `vae train`
process, then `vae eval --json` on the test split: the ELBO on all 10,000 images and the IWAE bound with
--iw-samples K on a fixed class-balanced subset (--limit; K=100 on all 10,000 is ~1M decoder passes, hours on
2 CPU cores). Prints bits/dim beside the classical codecs and writes bench-out/vae.json. With --weights it only
evaluates an existing model.

    python scripts/bench_vae.py [--data DIR] [--k 100] [--limit 2000] [--weights W] [key=value overrides ...]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_accuracy import train  # noqa: E402  (the same `vae train --json` runner)
from bench_cifar import cifar_root  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ANCHORS = "PNG 5.87, JPEG-2000 5.20, FLIF 4.37, IAF-VAE 3.55 (Kingma et al. 2016), VDVAE 2.87 bits/dim"


def evaluate(weights: str, k: int, limit: int | None) -> dict:
    cmd = [sys.executable, "-m", "vae_cli", "eval", weights, "--json", "--quiet", "--iw-samples", str(k)]
    cmd += ["--limit", str(limit)] if limit else []
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        sys.exit(f"error: evaluation failed with exit code {proc.returncode}")
    res = json.loads(proc.stdout)
    res["eval_seconds"] = round(time.perf_counter() - t0, 1)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description="CIFAR-10 generative (bits/dim) benchmark")
    ap.add_argument("--data", type=Path, default=None, help="CIFAR-10 JPEG folders (default: unpack the shared one)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench-out")
    ap.add_argument("--k", type=int, default=100, help="importance samples per image")
    ap.add_argument("--limit", type=int, default=2000, help="test images for the IWAE bound (0: all)")
    ap.add_argument("--weights", default=None, help="evaluate this model instead of training one")
    argv = sys.argv[1:]
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    args = ap.parse_args([a for a in argv if a not in overrides])
    run = None
    if args.weights is None:
        run = train("recipes/cifar10-vae.yaml", 0, cifar_root(args.data, args.out), args.out, overrides)
        args.weights = str(Path(run["run_dir"]) / "model.safetensors")
    elbo = evaluate(args.weights, 0, None)  # every test image, one posterior draw each
    iwae = evaluate(args.weights, args.k, args.limit or None)
    dims = 3 * 32 * 32
    report = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d"),
              "train": run, "weights": args.weights,
              "elbo_bits_per_dim": -elbo["elbo"] / (dims * math.log(2)), "elbo_images": elbo["n"],
              "iwae": iwae["nll"], "iwae_images": iwae["n"], "recon_accuracy": elbo["recon_accuracy"],
              "sample_accuracy": elbo["sample_accuracy"], "accuracy": elbo["accuracy"],
              "eval_seconds": [elbo["eval_seconds"], iwae["eval_seconds"]]}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "vae.json").write_text(json.dumps(report, indent=2))
    print(f"test ELBO {report['elbo_bits_per_dim']:.3f} bits/dim ({elbo['n']} images); IWAE k={args.k} "
          f"{iwae['nll']['bits_per_dim']:.3f} bits/dim ({iwae['n']} images, class-balanced); recon_accuracy "
          f"{elbo['recon_accuracy']:.3f}, sample_accuracy {elbo['sample_accuracy']:.3f}, M1 accuracy "
          f"{elbo['accuracy']:.3f}")
    print(f"anchors: {ANCHORS}")


if __name__ == "__main__":
    main()
