"""Exported classifier against `vae classify`: `make bench-export`.

On 10,000 MNIST test images written as PNG files (from ../shared/data/mnist), with a trained MNIST model
(default: the seed-0 model of `make bench-accuracy`):
  1. `vae classify WEIGHTS FOLDER --format csv` wall-clock, start-up included;
  2. `vae export WEIGHTS --format onnx`, then onnxruntime on the same files in a fresh process: decoding
     with Pillow as the export's metadata says (grey, resize, /255, threshold when binarised) and
     predicting in batches of 256, wall-clock, start-up included;
and the agreement of the two (share of identical top-1 classes, max |prob difference|).
Results go to bench-out/export.json.

    python scripts/bench_export.py [--weights W] [--mnist DIR]
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import platform
import subprocess
import sys
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_accuracy import ROOT, mnist_root  # noqa: E402
from bench_speed import export_pngs  # noqa: E402

VAE = [sys.executable, "-m", "vae_cli"]

ORT_SCRIPT = textwrap.dedent("""
    import json, sys, time
    t0 = time.perf_counter()
    from pathlib import Path
    import numpy as np, onnxruntime as ort
    from PIL import Image
    sess = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
    meta = sess.get_modelmeta().custom_metadata_map
    classes, h, w = json.loads(meta["classes"]), int(meta["height"]), int(meta["width"])
    mode = "L" if meta["channels"] == "1" else "RGB"
    binarize = json.loads(meta["binarize"])
    files = sorted(p for p in Path(sys.argv[2]).rglob("*.png"))
    out = []
    for i in range(0, len(files), 256):
        batch = []
        for p in files[i:i + 256]:
            with Image.open(p) as im:
                im = im.convert(mode)
                if im.size != (w, h):
                    im = im.resize((w, h), Image.BILINEAR)
                a = np.asarray(im, np.float32) / 255.0
            batch.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
        x = np.stack(batch)
        if binarize:
            x = (x > 0.5).astype(np.float32)
        probs = sess.run(None, {"image": x})[0]
        out += [[str(p), classes[int(j)], float(q)] for p, j, q in zip(files[i:i + 256], probs.argmax(1), probs.max(1))]
    json.dump({"rows": out, "seconds": time.perf_counter() - t0}, sys.stdout)
""")


def main() -> None:
    ap = argparse.ArgumentParser(description="onnxruntime against vae classify on 10,000 MNIST PNGs")
    ap.add_argument("--weights", type=Path, default=ROOT / "bench-out" / "runs" / "mnist-100-labels-seed0" /
                    "model.safetensors")
    ap.add_argument("--mnist", type=Path, default=ROOT.parent / "shared" / "data" / "mnist")
    ap.add_argument("--out", type=Path, default=ROOT / "bench-out")
    args = ap.parse_args()
    if not args.weights.is_file():
        sys.exit(f"error: {args.weights} is missing; run `make bench-accuracy` first or pass --weights")
    folder = export_pngs(mnist_root(args.mnist, args.out), args.out / "pngs", 10000)
    t0 = time.perf_counter()
    proc = subprocess.run([*VAE, "classify", str(args.weights), str(folder), "--format", "csv"], cwd=ROOT,
                          stdout=subprocess.PIPE, text=True, check=True)
    vae_wall = time.perf_counter() - t0
    vae_rows = list(csv.DictReader(io.StringIO(proc.stdout)))
    onnx_path = args.out / "mnist-classifier.onnx"
    t1 = time.perf_counter()
    subprocess.run([*VAE, "export", str(args.weights), "-o", str(onnx_path)], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL)
    export_s = time.perf_counter() - t1
    t2 = time.perf_counter()
    ort = subprocess.run([sys.executable, "-c", ORT_SCRIPT, str(onnx_path), str(folder)], stdout=subprocess.PIPE,
                         text=True, check=True)
    ort_wall = time.perf_counter() - t2
    ort_rows = json.loads(ort.stdout)["rows"]
    same = sum(a["class"] == b[1] for a, b in zip(vae_rows, ort_rows)) / len(vae_rows)
    prob_diff = max(abs(float(a["prob"]) - b[2]) for a, b in zip(vae_rows, ort_rows))
    report = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d"),
              "files": len(vae_rows), "vae_classify": {"wall_s": round(vae_wall, 2),
                                                       "images_per_s": round(len(vae_rows) / vae_wall, 1)},
              "export_s": round(export_s, 2),
              "onnxruntime": {"wall_s": round(ort_wall, 2), "images_per_s": round(len(ort_rows) / ort_wall, 1)},
              "same_top1": same, "max_prob_diff": prob_diff}
    (args.out / "export.json").write_text(json.dumps(report, indent=2))
    print(f"vae classify: {report['vae_classify']['images_per_s']} images/s ({vae_wall:.1f} s wall for "
          f"{len(vae_rows)} PNGs, start-up included)")
    print(f"onnxruntime:  {report['onnxruntime']['images_per_s']} images/s ({ort_wall:.1f} s wall, start-up "
          f"included; export took {export_s:.1f} s)")
    print(f"agreement: {same:.2%} identical top-1 classes, max |prob difference| {prob_diff:.2e}")


if __name__ == "__main__":
    main()
