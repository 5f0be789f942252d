"""Evaluation benchmark: `make bench-eval`.

Reports, on this machine:
  1. the IWAE negative log-likelihood (K = --k, default 5000) of recipes/mnist-vae.yaml on dynamically
     binarised MNIST, against pythae's reproductions (VAE 89.78, IWAE 86.82, VAMP 85.79 nats). K = 5000
     costs 5000 decoder passes per image (hours for 10,000 images on 2 cores), so it is measured on the
     first --limit test images, K = 100 on all 10,000, and the full-set K = 5000 number is estimated as
     NLL_100(all) + [NLL_5000 - NLL_100](first --limit, paired: same images); bf16 autocast, after
     checking against fp32 on 100 images;
  2. `vae classify --reject` rates on real PNG files: held-back test digits (false rejects) against noise,
     letters and shapes drawn by tests/imagegen.py, for the MNIST model and the digits demo model.
Results go to stdout and bench-out/eval.json.

    python scripts/bench_eval.py [--k 5000] [--limit 1000] [--reuse]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_accuracy import ROOT, mnist_root  # noqa: E402
from bench_speed import export_pngs  # noqa: E402

sys.path.insert(0, str(ROOT))
from tests.imagegen import outliers  # noqa: E402

VAE = [sys.executable, "-m", "vae_cli"]
PUBLISHED = {"VAE (pythae)": 89.78, "IWAE k=50 (pythae)": 86.82, "VAMP (pythae)": 85.79}


def run(args: list[str]) -> tuple[dict | list, float]:
    line = "$ vae " + " ".join(args)
    print(line if len(line) < 300 else line[:300] + f" ... ({len(args)} arguments)", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run([*VAE, *args], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        sys.exit(f"error: `vae {' '.join(args)}` failed ({proc.returncode})")
    return json.loads(proc.stdout), round(time.perf_counter() - t0, 1)


def train(recipe: str, name: str, out: Path, extra: list[str], reuse: bool) -> Path:
    weights = out / "runs" / name / "model.safetensors"
    if not (reuse and weights.is_file()):
        res, secs = run(["train", recipe, "--out", str(out / "runs"), "--name", name, "--exist-ok", "--json",
                         "--quiet", *extra])
        print(f"trained {name} in {secs}s (test accuracy {res['test']['accuracy']:.4f})", file=sys.stderr)
    return weights


def reject_rates(weights: Path, groups: dict[str, list[Path]]) -> dict:
    rates = {}
    for kind, paths in groups.items():
        rows, secs = run(["classify", str(weights), *map(str, paths), "--reject", "-f", "json"])
        rates[kind] = {"images": len(rows), "rejected": round(sum(r["rejected"] for r in rows) / len(rows), 4)}
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description="MNIST/digits evaluation benchmark")
    ap.add_argument("--mnist", type=Path, default=ROOT.parent / "shared" / "data" / "mnist")
    ap.add_argument("--out", type=Path, default=ROOT / "bench-out")
    ap.add_argument("--k", type=int, default=5000, help="importance samples for the headline NLL")
    ap.add_argument("--limit", type=int, default=200, help="test images scored with --k samples")
    ap.add_argument("--reuse", action="store_true", help="reuse trained weights in bench-out/runs")
    args = ap.parse_args()
    data_root = mnist_root(args.mnist, args.out)
    report: dict = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                    "date": time.strftime("%Y-%m-%d"), "published_nats": PUBLISHED}

    mnist = train("recipes/mnist-vae.yaml", "mnist-vae", args.out, [f"data.root={data_root}"], args.reuse)
    ev = ["eval", str(mnist), "--json"]
    check = {p: run([*ev, "--iw-samples", "100", "--limit", "100", "--precision", p])[0]["nll"]["nats"]
             for p in ("fp32", "bf16")}
    report["precision_check_k100_100_images"] = check
    full, secs = run([*ev, "--iw-samples", "100", "--precision", "bf16"])
    report["mnist_k100_full"] = {**full["nll"], "elbo": full["elbo"], "active_units": full["active_units"],
                                 "accuracy": full["accuracy"], "seconds": secs}
    head, secs = run([*ev, "--iw-samples", str(args.k), "--limit", str(args.limit), "--precision", "bf16"])
    report["mnist_headline"] = {**head["nll"], "images": head["n"], "seconds": secs}
    same, _ = run([*ev, "--iw-samples", "100", "--limit", str(args.limit), "--precision", "bf16"])
    report["mnist_k100_same_images"] = same["nll"]
    report["mnist_estimate_full_set"] = round(full["nll"]["nats"] + head["nll"]["nats"] - same["nll"]["nats"], 3)

    pngs = export_pngs(data_root, args.out / "pngs", 10000)
    made = outliers(args.out / "outliers-28", (28, 28), count=100)
    report["mnist_reject"] = reject_rates(mnist, {"mnist_test": sorted(pngs.rglob("*.png"))[:1000], **made})

    digits = train("recipes/digits.yaml", "digits", args.out, [], args.reuse)
    export = args.out / "digits-png"
    subprocess.run([sys.executable, "scripts/export_digits.py", str(export), "--count", "359"], cwd=ROOT,
                   check=True, stdout=subprocess.DEVNULL)
    made8 = outliers(args.out / "outliers-8", (32, 32), count=100)
    report["digits_reject"] = reject_rates(digits, {"digits_test": sorted(export.rglob("*.png")), **made8})

    (args.out / "eval.json").write_text(json.dumps(report, indent=2))
    h = report["mnist_headline"]
    print(f"IWAE NLL, K={h['iw_samples']}, first {h['images']} test images: {h['nats']:.2f} ± "
          f"{h['stderr_nats']:.2f} nats ({h['seconds']}s); K=100 on the same images "
          f"{report['mnist_k100_same_images']['nats']:.2f}; K=100 on all 10,000: "
          f"{report['mnist_k100_full']['nats']:.2f} (ELBO {report['mnist_k100_full']['elbo']:.2f}); "
          f"estimated K={h['iw_samples']} on all 10,000: {report['mnist_estimate_full_set']:.2f}")
    for name, value in PUBLISHED.items():
        print(f"  {name}: {value}")
    for model in ("mnist_reject", "digits_reject"):
        print(model + ": " + ", ".join(f"{k} {v['rejected']:.1%} of {v['images']}" for k, v in report[model].items()))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
