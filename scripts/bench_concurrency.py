"""Trainings side by side on one box: `make bench-concurrency`.

Runs one training alone, then 2 and 3 identical trainings started together (real `vae train` processes),
and reports each one's training speed (images/s over epochs 2..N from its metrics.csv, so start-up and
data loading do not count), the total, and each one's share of the alone speed. `--env K=V` sets variables
for every process (to compare settings), `--threads N` passes `vae --threads N`, `--taskset CPUS` pins every
process to those CPUs (`taskset -c`: a quota of one core is `--taskset 0`). `--classify DIR` then runs
`vae classify` on the image files under DIR (default for the digits recipe: the held-back digits as PNGs)
with the first alone run's model, back to back, alone and beside one training, and reports the training's
share and classify's images/s (wall-clock, start-up included) in both.

    python scripts/bench_concurrency.py [--recipe recipes/digits.yaml] [--jobs 1 2 3] [--classify [DIR]]
                                        [key=value ...]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def speed(run_dir: Path, images_per_epoch: int) -> float:
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))[1:]  # epoch 1 warms up
    return images_per_epoch * len(rows) / sum(float(r["seconds"]) for r in rows)


def _env(args) -> dict:
    return {**os.environ, **dict(kv.split("=", 1) for kv in args.env)}


def _vae(args) -> list[str]:
    pin = ["taskset", "-c", args.taskset] if args.taskset else []
    return [*pin, sys.executable, "-m", "vae_cli", *(["--threads", str(args.threads)] if args.threads else [])]


def _start_training(args, out: Path, name: str) -> subprocess.Popen:
    cmd = [*_vae(args), "train", args.recipe, "--out", str(out), "--name", name, "--exist-ok", "--quiet", "--json",
           *args.overrides]
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(args), stdout=subprocess.PIPE, text=True)


def batch(n: int, args, out: Path) -> list[float]:
    procs = [_start_training(args, out, f"n{n}-{i}") for i in range(n)]
    speeds = []
    for i, p in enumerate(procs):
        stdout, _ = p.communicate()
        if p.returncode != 0:
            sys.exit(f"error: training {i} of {n} failed ({p.returncode})")
        json.loads(stdout)  # the run's result: it finished
        speeds.append(speed(out / f"n{n}-{i}", args.images or _train_images(out / f"n{n}-{i}")))
    return speeds


def _classify_loop(args, weights: Path, folder: Path, until) -> float:
    """`vae classify` run back to back until `until()` is true (at least once): images/s, wall-clock."""
    files = sum(1 for p in folder.rglob("*") if p.is_file())
    done, t0 = 0, time.perf_counter()
    while True:
        subprocess.run([*_vae(args), "classify", str(weights), str(folder), "--format", "csv"], cwd=ROOT,
                       env=_env(args), stdout=subprocess.DEVNULL, check=True)
        done += files
        if until():
            return done / (time.perf_counter() - t0)


def beside_classify(args, out: Path, alone: float) -> list[str]:
    folder = args.classify
    if folder == Path("digits"):  # the 359 held-back digits of the demo recipe as 8x8 PNGs, 28 times: 10,052
        folder = out / "digit-pngs"
        if not folder.is_dir():
            subprocess.run([sys.executable, "scripts/export_digits.py", str(folder / "0"), "--count", "359",
                            "--scale", "1"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
            for copy in range(1, 28):
                shutil.copytree(folder / "0", folder / str(copy))
    weights = out / "n1-0" / "model.safetensors"
    t_end = time.perf_counter() + 20
    classify_alone = _classify_loop(args, weights, folder, lambda: time.perf_counter() > t_end)
    train = _start_training(args, out, "beside-classify")
    classify_beside = _classify_loop(args, weights, folder, lambda: train.poll() is not None)
    if train.wait() != 0:
        sys.exit("error: the training beside classify failed")
    s = speed(out / "beside-classify", args.images or _train_images(out / "beside-classify"))
    return [f"classify alone: {classify_alone:,.0f} img/s (back to back, start-up included)",
            f"1 training + classify back to back: training {s:,.0f} img/s ({s / alone:.0%} of alone), "
            f"classify {classify_beside:,.0f} img/s ({classify_beside / classify_alone:.0%} of alone)"]


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
    ap.add_argument("--taskset", default=None, help="CPUs every process is pinned to (taskset -c), e.g. 0")
    ap.add_argument("--classify", type=Path, nargs="?", const=Path("digits"), default=None,
                    help="also classify image files beside a training (default: the digits as PNGs)")
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
    if args.classify is not None and alone:
        for line in beside_classify(args, args.out, alone):
            print(line, flush=True)
    print(f"recipe {args.recipe} {' '.join(args.overrides)}; env {' '.join(args.env) or '-'}; "
          f"threads {args.threads or 'auto'}; taskset {args.taskset or '-'}; {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
