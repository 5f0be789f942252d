"""`scripts/device_check.sh`, the GPU checks in one command (issue 32): its CPU half runs here. Asked for cuda
on a machine without a GPU it fails at once with a line that says so (exit 2), never a silent skip; with
`--device cpu --quick` every check runs and passes, one line each."""

from __future__ import annotations

import os
import subprocess

import pytest
import torch

from .conftest import ROOT


def _check(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "scripts/device_check.sh", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu_fails_clearly():
    res = _check()
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("FAIL device") and "sees no GPU" in lines[0]


def test_the_cpu_half_runs_every_check(tmp_path):
    res = _check("--device", "cpu", "--quick", "--out", str(tmp_path))
    lines = res.stdout.splitlines()
    assert res.returncode == 0, res.stdout + res.stderr
    names = [ln.split()[1] for ln in lines[:-1]]
    assert all(ln.startswith("PASS ") for ln in lines[:-1]), res.stdout
    assert names[:3] == ["device", "suite", "digits-fp32"] and "classify" in names and "torchrun" in names
    assert "img/s" in next(ln for ln in lines if "digits-fp32" in ln)
    assert lines[-1].startswith("all checks passed")
