"""Cron- and Makefile-safety with real processes: kills and resume, signals, locks, atomic writes,
divergence, promotion."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .conftest import ROOT, TINY

# 1,438 digits, 23 steps per epoch, 4 epochs: a few seconds of training after a ~2 s start-up.
ARGS = ["data.train_limit=null", "epochs=4", "train.checkpoint_every=5", "--precision", "fp32", "--device", "cpu"]


def _cmd(out: Path, name: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "vae_cli", "train", str(TINY), "--out", str(out), "--name", name, *ARGS, *extra]


def _env(**extra: str) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "2", **extra}


def _run(cmd: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=_env(**env), timeout=300)


def _start(cmd: list[str], **env: str) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(**env))


def _wait_for_line(proc: subprocess.Popen, needle: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if needle in line:
            return
        if not line and proc.poll() is not None:
            raise AssertionError(f"process ended before printing {needle!r}")
    raise AssertionError(f"no {needle!r} within {timeout}s")


def _same_weights(a: Path, b: Path) -> bool:
    ta, tb = load_file(str(a)), load_file(str(b))
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref")
    res = _run(_cmd(out, "ref", "--quiet"))
    assert res.returncode == 0, res.stderr
    return out / "ref" / "model.safetensors"


def _kill_at(proc: subprocess.Popen, point: str, run_dir: Path) -> None:
    if point == "start":  # before any checkpoint exists
        time.sleep(0.3)
    elif point == "first-state":  # right after a mid-epoch state file appears
        deadline = time.monotonic() + 120
        while not (run_dir / "last.safetensors").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
    else:  # "epoch-N": as the epoch line is printed, i.e. during the end-of-epoch writes
        _wait_for_line(proc, f"epoch {point.split('-')[1]}/")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


@pytest.mark.parametrize("points", [["start"], ["first-state"], ["epoch-1"], ["epoch-2", "epoch-3"]],
                         ids=lambda p: "+".join(p))
def test_sigkill_then_resume_gives_identical_weights(tmp_path, reference, points):
    run_dir = tmp_path / "r"
    for point in points:
        proc = _start(_cmd(tmp_path, "r", "resume=true" if run_dir.exists() else "--exist-ok"))
        _kill_at(proc, point, run_dir)
        assert proc.returncode == -signal.SIGKILL
    res = _run(_cmd(tmp_path, "r", "--resume"))
    assert res.returncode == 0, res.stderr
    assert _same_weights(reference, run_dir / "model.safetensors")
    assert not list(run_dir.glob(".*.tmp")) and not list(run_dir.glob(".vae-tmp-*"))


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_writes_a_resumable_checkpoint(tmp_path, reference, sig, code):
    proc = _start(_cmd(tmp_path, "r"))
    _wait_for_line(proc, "epoch 1/")
    t0 = time.monotonic()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == code, err
    assert time.monotonic() - t0 < 10
    assert "resumable state" in err and "Traceback" not in err
    assert (tmp_path / "r" / "last.safetensors").is_file() and not list((tmp_path / "r").glob(".*.tmp")) \
        and not list((tmp_path / "r").glob(".vae-tmp-*"))
    res = _run(_cmd(tmp_path, "r", "--resume"))
    assert res.returncode == 0, res.stderr
    assert _same_weights(reference, tmp_path / "r" / "model.safetensors")


def test_second_writer_gets_exit_75_naming_the_holder(tmp_path):
    first = _start(_cmd(tmp_path, "r", "epochs=30"))
    _wait_for_line(first, "training 'vae'")
    second = _run(_cmd(tmp_path, "r", "--exist-ok"))
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert second.returncode == 75, second.stderr
    assert f"pid {first.pid}" in second.stderr and "host" in second.stderr
    # the holder died: its lock is free for the next run, which gets past it to the recipe check
    third = _run(_cmd(tmp_path, "r", "--resume", "epochs=30", "model.latent_dim=5"))
    assert third.returncode == 2 and "model.latent_dim" in third.stderr


def test_resume_with_a_different_recipe_is_refused(tmp_path):
    proc = _start(_cmd(tmp_path, "r"))
    _wait_for_line(proc, "epoch 1/")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    res = _run(_cmd(tmp_path, "r", "--resume", "model.latent_dim=5"))
    assert res.returncode == 2 and "model.latent_dim" in res.stderr


def test_nan_stops_with_the_step_and_keeps_the_last_good_state(tmp_path):
    res = _run(_cmd(tmp_path, "r"), VAE_INJECT_NAN_STEP="12")
    assert res.returncode == 1
    assert "loss became nan at step 12 (epoch 1)" in res.stderr and "Traceback" not in res.stderr
    state = load_file(str(tmp_path / "r" / "last.safetensors"))
    assert state and not (tmp_path / "r" / "model.safetensors").exists()
    res = _run(_cmd(tmp_path, "r2", "train.skip_nonfinite=true"), VAE_INJECT_NAN_STEP="12")
    assert res.returncode == 0 and "skipped a batch with loss nan at step 12" in res.stderr


def test_interrupted_write_leaves_the_previous_file(tmp_path, monkeypatch):
    from vae_cli.core import fsutil

    target = tmp_path / "model.safetensors"
    target.write_bytes(b"previous version")

    def crash(src, dst):
        raise KeyboardInterrupt  # the process dies between the temp file and the rename

    monkeypatch.setattr(fsutil.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        fsutil.write_text(target, "new version")
    assert target.read_bytes() == b"previous version"
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_promotion_exit_codes_and_atomic_copy(tmp_path):
    prod = tmp_path / "prod.safetensors"
    good = _run(_cmd(tmp_path, "good", "--promote", str(prod), "--json", "--quiet"))
    assert good.returncode == 0, good.stderr
    assert '"promoted": true' in good.stdout and prod.is_file()
    before = prod.read_bytes()
    worse = _run(_cmd(tmp_path, "worse", "epochs=1", "--promote", str(prod), "--promote-metric", "elbo", "--quiet"))
    assert worse.returncode == 3, worse.stderr
    assert "kept the old model" in worse.stdout and prod.read_bytes() == before
    bad_metric = _run(_cmd(tmp_path, "x", "--promote", str(prod), "--promote-metric", "loss"))
    assert bad_metric.returncode == 2 and "--promote-metric must be one of" in bad_metric.stderr


def test_full_disk_is_one_line_and_keeps_files(tmp_path, runner, monkeypatch):
    import errno

    from vae_cli.artifacts import checkpoint
    from vae_cli.cli import app

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "tiny" / "model.safetensors"))

    monkeypatch.setattr(checkpoint, "save", full)
    res = runner.invoke(app, ["train", str(TINY), "--out", str(tmp_path), "--device", "cpu", "epochs=1"])
    assert res.exit_code == 1 and "no space left on the device while writing" in res.stderr
    assert "Traceback" not in res.stderr
    assert (tmp_path / "tiny" / "last.safetensors").is_file()  # the resumable state survived
