"""Few-label accuracy benchmark on full MNIST: `make bench-accuracy`.

Trains recipes/mnist-100-labels.yaml (10 labels per class) once per seed (the seed picks the labelled
subset and the initial weights) and recipes/mnist.yaml (all labels) once, each as a real `vae train`
process, then prints test error (mean and spread over seeds) and wall time. Results also go to
bench-out/accuracy.json. MNIST comes from ../shared/data/mnist (or --mnist DIR) and is linked into a
torchvision-style root, so nothing is downloaded.

    python scripts/bench_accuracy.py [--seeds 0 1 2] [--skip-full] [key=value overrides ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
               "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def mnist_root(src: Path, out: Path) -> Path:
    raw = out / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name in MNIST_FILES:
        if not (src / name).is_file():
            sys.exit(f"error: {src / name} is missing; pass --mnist DIR holding the 4 MNIST .gz files")
        link = raw / name
        if not link.exists():
            link.symlink_to((src / name).resolve())
    return out / "data"


def train(recipe: str, seed: int, data_root: Path, out: Path, overrides: list[str]) -> dict:
    cmd = [sys.executable, "-m", "vae_cli", "train", recipe, f"data.root={data_root}", "--seed", str(seed),
           "--out", str(out / "runs"), "--name", f"{Path(recipe).stem}-seed{seed}", "--exist-ok", "--json",
           *overrides]
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        sys.exit(f"error: training failed with exit code {proc.returncode}")
    res = json.loads(proc.stdout)
    return {"recipe": recipe, "seed": seed, "test_error": 1.0 - res["test"]["accuracy"],
            "train_seconds": res["train_seconds"], "wall_seconds": round(time.perf_counter() - t0, 1),
            "precision": res["precision"], "run_dir": res["run_dir"]}


def summary(rows: list[dict]) -> str:
    errs = [r["test_error"] * 100 for r in rows]
    spread = statistics.stdev(errs) if len(errs) > 1 else 0.0
    secs = statistics.mean(r["train_seconds"] for r in rows)
    return (f"{rows[0]['recipe']}: test error {statistics.mean(errs):.2f}% +- {spread:.2f} "
            f"(seeds {', '.join(str(r['seed']) for r in rows)}: {', '.join(f'{e:.2f}%' for e in errs)}); "
            f"mean training time {secs / 60:.1f} min")


def main() -> None:
    ap = argparse.ArgumentParser(description="MNIST few-label accuracy benchmark")
    ap.add_argument("--mnist", type=Path, default=ROOT.parent / "shared" / "data" / "mnist")
    ap.add_argument("--out", type=Path, default=ROOT / "bench-out")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--skip-full", action="store_true", help="skip the all-labels run")
    ap.add_argument("overrides", nargs="*", help="key=value overrides for every run (anywhere on the line)")
    # key=value words are overrides wherever they stand: after `--seeds 0 1` argparse would read them as seeds
    argv = sys.argv[1:]
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    args = ap.parse_args([a for a in argv if a not in overrides])
    args.overrides = overrides
    data_root = mnist_root(args.mnist, args.out)
    few = [train("recipes/mnist-100-labels.yaml", s, data_root, args.out, args.overrides) for s in args.seeds]
    lines = [summary(few)]
    full = []
    if not args.skip_full:
        full = [train("recipes/mnist.yaml", 0, data_root, args.out, args.overrides)]
        lines.append(summary(full))
    report = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, torch threads default",
              "date": time.strftime("%Y-%m-%d"), "few_labels": few, "all_labels": full, "summary": lines}
    (args.out / "accuracy.json").write_text(json.dumps(report, indent=2))
    print("\n".join(lines))
    print("anchors (100 labels): M2 11.97%, M1+M2 3.33% (Kingma et al. 2014); ADGM 0.96% (Maaloe et al. 2016)")


if __name__ == "__main__":
    main()
