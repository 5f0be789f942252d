"""The GPU checks in one command (issue 32): GPU time comes in minutes, so everything the CUDA path needs is
run by this one script, one line per check, within about 8 minutes on one GPU.

    bash scripts/device_check.sh                      # on the GPU machine: --device cuda
    bash scripts/device_check.sh --device cpu --quick  # its CPU half: the same checks, small, on this machine
    bash scripts/device_check.sh --cifar /data/cifar10-jpg   # adds 2 epochs of the CIFAR-10 recipes

Checks: the device is there (asked for cuda without a GPU: FAIL at once, exit 2, never a silent skip); the
suite's device tests (`tests/test_device.py`); the digits recipe trained in bf16 and in fp16 (GradScaler), with
images/s; `classify` and `export` (TorchScript; ONNX when onnx is installed) of that model; 2 epochs of
`cifar10-4000-labels` and `cifar10-vae` when --cifar is given; a 1-process `torchrun` (nccl on a GPU, gloo on the
CPU). Exit 0 when every check passed, 1 when one failed, 2 when the device is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VAE = [sys.executable, "-m", "vae_cli"]


def run(cmd: list[str], timeout: float, env: dict | None = None) -> tuple[int, str, str, float]:
    t0 = time.monotonic()
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, **(env or {})})
        return p.returncode, p.stdout, p.stderr, time.monotonic() - t0
    except subprocess.TimeoutExpired:
        return 124, "", f"timed out after {timeout:.0f}s", time.monotonic() - t0


class Report:
    def __init__(self) -> None:
        self.failed = 0

    def line(self, ok: bool, name: str, detail: str) -> None:
        self.failed += not ok
        print(f"{'PASS' if ok else 'FAIL'} {name:<22} {detail}", flush=True)

    def command(self, name: str, cmd: list[str], timeout: float, env: dict | None = None) -> str | None:
        code, out, err, took = run(cmd, timeout, env)
        if code != 0:
            last = (err.strip().splitlines() or ["(no output)"])[-1]
            self.line(False, name, f"exit {code} after {took:.0f}s: {last[:300]}")
            return None
        return out


def device_present(device: str) -> tuple[bool, str]:
    code, out, err, _ = run([sys.executable, "-c", "import torch; print(torch.__version__, torch.version.cuda, "
                             "torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() "
                             "else '')"], 120)
    if code != 0:
        return False, f"torch does not import: {err.strip()[-200:]}"
    version, cuda, available, name = (out.strip().split(" ", 3) + [""] * 4)[:4]
    if device == "cuda" and available != "True":
        return False, f"--device cuda asked for, but torch {version} (CUDA {cuda}) sees no GPU"
    return True, f"torch {version}, CUDA {cuda}, {name or 'cpu'}"


def images_per_second(run_dir: Path) -> float:
    """Training images per second of the epochs' steps: steps x batch size over the epochs' seconds
    (metrics.csv and the run's recipe.yaml; the last batch of an epoch may be short, so it is a slight
    overestimate)."""
    import csv

    import yaml

    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    batch = yaml.safe_load(open(run_dir / "recipe.yaml"))["train"]["batch_size"]
    return int(rows[-1]["step"]) * batch / max(1e-9, sum(float(r["seconds"]) for r in rows))


def train(rep: Report, name: str, recipe: str, out: Path, device: str, precision: str, timeout: float,
          *overrides: str) -> Path | None:
    text = rep.command(name, [*VAE, "train", recipe, "--out", str(out), "--name", name, "--device", device,
                              "--precision", precision, "--json", "--quiet", *overrides], timeout)
    if text is None:
        return None
    res = json.loads(text)
    rate = f", {images_per_second(Path(res['run_dir'])):.0f} img/s"
    acc, elbo = res["test"]["accuracy"], res["test"]["elbo"]
    ok = elbo == elbo and abs(elbo) != float("inf")
    rep.line(ok, name, f"{res['device']}/{res['precision']}, {res['train_seconds']:.1f}s training{rate}, "
                       f"test accuracy {acc:.4f}, ELBO {elbo:.2f}")
    return Path(res["paths"]["weights"]) if ok else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--quick", action="store_true", help="1 epoch each (the CPU half's dry run)")
    ap.add_argument("--cifar", type=Path, help="CIFAR-10 as JPEG class folders: adds 2 epochs of its recipes")
    ap.add_argument("--out", type=Path, help="where the runs go (default: a temporary folder)")
    args = ap.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="vae-device-"))
    rep = Report()
    ok, detail = device_present(args.device)
    rep.line(ok, "device", detail)
    if not ok:
        return 2
    epochs = "epochs=1" if args.quick else "epochs=10"
    code, _, err, took = run([sys.executable, "-m", "pytest", "-q", "-x", "tests/test_device.py"], 300,
                             {"VAE_TEST_DEVICE": args.device})
    summary = (err.strip().splitlines() or [""])[-1] if code else "passed"
    rep.line(code == 0, "suite (device tests)", f"{summary} in {took:.0f}s")
    precisions = ["bf16", "fp16"] if args.device == "cuda" else ["fp32"]
    weights = None
    for p in precisions:
        weights = train(rep, f"digits-{p}", "recipes/digits.yaml", out, args.device, p, 300, epochs) or weights
    if weights is not None:
        images = out / "images"
        subprocess.run([sys.executable, "scripts/export_digits.py", str(images), "--count", "20"], cwd=ROOT,
                       capture_output=True)
        t0 = time.monotonic()
        text = rep.command("classify", [*VAE, "classify", str(weights), str(images), "--device", args.device,
                                        "--format", "json"], 300)
        if text is not None:
            rows = json.loads(text)
            rep.line(bool(rows), "classify", f"{len(rows)} files in {time.monotonic() - t0:.1f}s")
        for fmt in ("torchscript", "onnx"):
            if fmt == "onnx" and subprocess.run(
                    [sys.executable, "-c", "import onnx, onnxruntime"], capture_output=True).returncode:
                rep.line(True, "export onnx", "skipped: onnx/onnxruntime not installed (pip install 'vae-cli[export]')")
                continue
            text = rep.command(f"export {fmt}", [*VAE, "export", str(weights), "--format", fmt, "-o",
                                                 str(out / f"model.{fmt}"), "--json"], 300)
            if text is not None:
                diff = json.loads(text)["max_abs_diff"]
                rep.line(diff is not None and diff < 1e-3, f"export {fmt}", f"max |{fmt} - torch| = {diff:.2e}")
    if args.cifar is not None:
        for recipe in ("recipes/cifar10-4000-labels.yaml", "recipes/cifar10-vae.yaml"):
            train(rep, Path(recipe).stem, recipe, out, args.device, "auto", 600, "epochs=2", "train.minutes=0",
                  f"data.root={args.cifar}")
    backend = "nccl" if args.device == "cuda" else "gloo"
    text = rep.command(f"torchrun ({backend})", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                 "--nproc-per-node", "1", "-m", "vae_cli", "train", "recipes/tiny.yaml",
                                                 "--out", str(out), "--name", "ddp", "--device", args.device, "--json",
                                                 "--quiet"], 300)
    if text is not None:
        res = json.loads(text)
        rep.line(True, f"torchrun ({backend})", f"{res['train_seconds']:.1f}s, test accuracy "
                                                f"{res['test']['accuracy']:.4f}")
    print(f"{'all checks passed' if not rep.failed else f'{rep.failed} check(s) failed'}; runs in {out}")
    return 1 if rep.failed else 0


if __name__ == "__main__":
    sys.exit(main())
