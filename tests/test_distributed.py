"""A real 2-process torchrun on CPU (gloo over loopback)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT, TINY

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
            "--master-port", "0", "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:0"]


def _torchrun(out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [*TORCHRUN, "-m", "vae_cli", "train", str(TINY), "--out", str(out), "--device", "cpu",
           "--precision", "fp32", "--json", "data.train_limit=null", "epochs=2", *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.skipif(shutil.which("true") is None, reason="needs a POSIX system")
def test_two_processes_agree_and_rank0_writes_the_run(tmp_path):
    res = _torchrun(tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads(res.stdout)  # exactly one JSON object: only rank 0 reports
    assert result["processes"] == 2
    assert len(result["rank_checksums"]) == 2 and len(set(result["rank_checksums"])) == 1
    run = tmp_path / "tiny"
    assert {"recipe.yaml", "metrics.csv", "model.safetensors", "last.safetensors", "samples.png"} <= {
        p.name for p in run.iterdir()}
    assert not list(run.glob(".*.tmp")) and not (tmp_path / "tiny-2").exists()
    assert "2 processes" in res.stderr


def test_two_process_resume(tmp_path):
    first = _torchrun(tmp_path, "--name", "r", "epochs=1")
    assert first.returncode == 0, first.stderr[-3000:]
    # the same run, asked for 2 epochs, is a different recipe: refused rather than silently mixed
    again = _torchrun(tmp_path, "--name", "r", "--resume")
    assert again.returncode != 0 and "train.epochs" in again.stderr
    done = _torchrun(tmp_path, "--name", "r", "--resume", "epochs=1")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming" in done.stderr and len(set(json.loads(done.stdout)["rank_checksums"])) == 1


def test_two_processes_report_the_same_scale_of_training_loss_as_one(tmp_path):
    """metrics.csv's train_* columns are means over the epoch's images whatever the number of processes (each
    rank once added its loss times the global batch, so 2 processes reported about twice the loss)."""
    import csv

    two = _torchrun(tmp_path / "two")
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "vae_cli", "train", str(TINY), "--out", str(tmp_path / "one"),
                          "--device", "cpu", "--precision", "fp32", "--json", "data.train_limit=null", "epochs=2"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]

    def losses(run: Path) -> list[float]:
        with open(run / "tiny" / "metrics.csv", newline="") as f:
            return [float(r["train_loss"]) for r in csv.DictReader(f)]

    for a, b in zip(losses(tmp_path / "one"), losses(tmp_path / "two")):
        assert 0.8 < b / a < 1.25, (a, b)
