"""Seconds of a recipe's first training epoch, then the training is stopped: a quick speed comparison of two
versions of the code or two settings, without waiting for a whole run.

    python scripts/epoch_speed.py --out /tmp/es recipes/cifar10-4000-labels.yaml data.root=DIR train.minutes=0 epochs=20
    python scripts/epoch_speed.py --src /tmp/old-checkout --out /tmp/es ...   (another checkout's code)

Prints one line per run to stdout: the code's folder and the log's `epoch 1/N ... Xs` line. Run it on an
otherwise idle machine (two torch processes on the same cores slow each other).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path


def first_epoch(src: Path, out: Path, args: list[str]) -> str:
    cmd = [sys.executable, "-m", "vae_cli", "train", *args, "--out", str(out), "--exist-ok"]
    env = {**os.environ, "PYTHONPATH": str(src)}
    proc = subprocess.Popen(cmd, cwd=src, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        for line in proc.stderr:
            sys.stderr.write(line)
            if line.startswith("epoch 1/"):
                return line.strip()
        raise SystemExit(f"the training ended without an epoch line (exit {proc.wait()})")
    finally:
        proc.kill()
        proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", type=Path, default=Path(__file__).resolve().parents[1], help="the checkout to run")
    ap.add_argument("--out", type=Path, required=True, help="where the (stopped) run folder goes")
    ap.add_argument("train_args", nargs=argparse.REMAINDER, help="the recipe and its overrides")
    ns = ap.parse_args()
    print(ns.src, first_epoch(ns.src, ns.out, ns.train_args), flush=True)


if __name__ == "__main__":
    main()
