"""Trainings side by side on one box: `make bench-concurrency`.

Runs one training alone, then 2 and 3 identical trainings started together (real `vae train` processes),
and reports each one's training speed (images/s over epochs 2..N from its metrics.csv, so start-up and
data loading do not count), the total, and each one's share of the alone speed. `--env K=V` sets variables
for every process (to compare settings), `--threads N` passes `vae --threads N`.

    python scripts/bench_concurrency.py [--recipe recipes/digits.yaml] [--jobs 1 2 3] [key=value ...]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def speed(run_dir: Path, images_per_epoch: int) -> float:
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))[1:]  # epoch 1 warms up
    return images_per_epoch * len(rows) / sum(float(r["seconds"]) for r in rows)


def batch(n: int, args, out: Path) -> list[float]:
    env = {**os.environ, **dict(kv.split("=", 1) for kv in args.env)}
    pre = ["--threads", str(args.threads)] if args.threads else []
    procs = []
    for i in range(n):
        cmd = [sys.executable, "-m", "vae_cli", *pre, "train", args.recipe, "--out", str(out), "--name",
               f"n{n}-{i}", "--exist-ok", "--quiet", "--json", *args.overrides]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True))
    speeds = []
    for i, p in enumerate(procs):
        stdout, _ = p.communicate()
        if p.returncode != 0:
            sys.exit(f"error: training {i} of {n} failed ({p.returncode})")
        json.loads(stdout)  # the run's result: it finished
        speeds.append(speed(out / f"n{n}-{i}", args.images or _train_images(out / f"n{n}-{i}")))
    return speeds


def _train_images(run_dir: Path) -> int:
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    # steps per epoch x batch size over-counts the last partial batch by < 1 batch: fine for ratios
    steps = int(rows[0]["step"])
    from vae_cli.core import recipe as R

    return steps * R.load(run_dir / "recipe.yaml").train.batch_size


def main() -> None:
    ap = argparse.ArgumentParser(description="trainings side by side")
    ap.add_argument("--recipe", default="recipes/digits.yaml")
    ap.add_argument("--jobs", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--env", nargs="*", default=[], help="K=V set for every training process")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--images", type=int, default=None, help="training images per epoch (default: from the run)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench-out" / "concurrency")
    ap.add_argument("overrides", nargs="*", default=["train.epochs=40", "data.holdout_fraction=0"])
    args = ap.parse_args()
    alone = None
    lines = []
    for n in args.jobs:
        t0 = time.perf_counter()
        s = batch(n, args, args.out)
        alone = alone or (s[0] if n == 1 else None)
        share = ", ".join(f"{v / alone:.0%}" for v in s) if alone else "-"
        lines.append(f"{n} at once: {', '.join(f'{v:,.0f}' for v in s)} img/s each, total {sum(s):,.0f} "
                     f"(of alone: {share}; wall {time.perf_counter() - t0:.0f} s)")
        print(lines[-1], flush=True)
    print(f"recipe {args.recipe} {' '.join(args.overrides)}; env {' '.join(args.env) or '-'}; "
          f"threads {args.threads or 'auto'}; {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
