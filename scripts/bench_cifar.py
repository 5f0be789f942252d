"""Colour-photo benchmark on CIFAR-10 as JPEG class folders: `make bench-cifar`.

Trains recipes/cifar10-4000-labels.yaml (400 labels per class) once per seed (the seed picks the labelled
subset and the initial weights), and with --full recipes/cifar10.yaml (all labels), each as a real
`vae train` process; prints the error on all 10,000 test images and the wall time. Results also go to
bench-out/cifar.json. The JPEG folders come from ../shared/data/cifar10/cifar10-jpg.tar.gz, unpacked once
into bench-out/data (or --data DIR holding train/ and test/).

    python scripts/bench_cifar.py [--seeds 0] [--full] [key=value overrides ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_accuracy import summary, train  # noqa: E402  (the same `vae train --json` runner and report line)

ROOT = Path(__file__).resolve().parents[1]
ARCHIVE = ROOT.parent / "shared" / "data" / "cifar10" / "cifar10-jpg.tar.gz"


def cifar_root(data: Path | None, out: Path) -> Path:
    if data is not None:
        if not (data / "train").is_dir() or not (data / "test").is_dir():
            sys.exit(f"error: {data} needs train/<class>/ and test/<class>/ JPEG folders")
        return data
    root = out / "data" / "cifar10-jpg"
    if not (root / "test").is_dir():
        if not ARCHIVE.is_file():
            sys.exit(f"error: {ARCHIVE} is missing; pass --data DIR with CIFAR-10 as train/ and test/ class folders")
        print(f"unpacking {ARCHIVE} into {root.parent}", file=sys.stderr, flush=True)
        root.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(ARCHIVE) as tar:
            tar.extractall(root.parent, filter="data")
    return root


def main() -> None:
    ap = argparse.ArgumentParser(description="CIFAR-10 few-label accuracy benchmark")
    ap.add_argument("--data", type=Path, default=None, help="CIFAR-10 JPEG folders (default: unpack the shared one)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench-out")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--full", action="store_true", help="also train recipes/cifar10.yaml (all labels)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides for every run (anywhere on the line)")
    # key=value words are overrides wherever they stand: after `--seeds 0 1` argparse would read them as seeds
    argv = sys.argv[1:]
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    args = ap.parse_args([a for a in argv if a not in overrides])
    args.overrides = overrides
    root = cifar_root(args.data, args.out)
    few = [train("recipes/cifar10-4000-labels.yaml", s, root, args.out, args.overrides) for s in args.seeds]
    lines = [summary(few)]
    full = [train("recipes/cifar10.yaml", 0, root, args.out, args.overrides)] if args.full else []
    if full:
        lines.append(summary(full))
    report = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d"),
              "few_labels": few, "all_labels": full, "summary": lines}
    (args.out / "cifar.json").write_text(json.dumps(report, indent=2))
    print("\n".join(lines))
    print("anchors (4000 labels, test error): Ladder 20.4%, CatGAN 19.6%, Improved-GAN 18.6%, MixMatch 6.24%, "
          "SHOT-VAE 6.11%, FixMatch 4.26%")


if __name__ == "__main__":
    main()
