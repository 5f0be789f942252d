"""Inference numbers that do not depend on the cores (issue 30, core/pool.py): the batches of an evaluation run
on one thread each, as many at once as the cores granted, with a generator per batch; so what a training saves
after its loop (the knn reference features, the --reject calibration, the metrics) is the same whether the
run finished alone or beside another job."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest
import torch
from safetensors import safe_open
from torch import nn

from tests.test_shards import _same
from vae_cli.core import pool, rng

from .conftest import ROOT


def _work(xb: torch.Tensor) -> tuple[torch.Tensor, str]:
    """A float32 product big enough for torch to cut its reduction by thread, and a draw from the batch's
    generator."""
    w = torch.linspace(-1, 1, 512 * 512).reshape(512, 512)
    return (xb @ w).sum(1) + rng.randn(len(xb)), threading.current_thread().name


def _run(monkeypatch, cores: int):
    monkeypatch.setattr(pool, "granted_cores", lambda: cores)
    x = torch.randn(8 * 64, 512, generator=torch.Generator().manual_seed(0))
    out = pool.map_batches(_work, x.split(64), torch.device("cpu"), seed=3)
    return torch.cat([o for o, _ in out]), {name for _, name in out}


def test_the_batches_give_the_same_bits_on_any_number_of_cores(monkeypatch):
    one, threads_one = _run(monkeypatch, 1)
    two, threads_two = _run(monkeypatch, 2)
    assert len(threads_one) == 1 and len(threads_two) == 2  # two cores: two batches at once
    assert torch.equal(one, two)
    # each batch's draws are its own: another seed moves them, the same seed repeats them
    monkeypatch.setattr(pool, "granted_cores", lambda: 2)
    x = torch.zeros(8 * 64, 512)
    a = torch.cat([o for o, _ in pool.map_batches(_work, x.split(64), torch.device("cpu"), seed=3)])
    b = torch.cat([o for o, _ in pool.map_batches(_work, x.split(64), torch.device("cpu"), seed=4)])
    assert not torch.equal(a, b)
    assert torch.equal(a, torch.cat([o for o, _ in pool.map_batches(_work, x.split(64), torch.device("cpu"), 3)]))


def test_batches_run_without_gradients_in_order_and_report_progress(monkeypatch):
    monkeypatch.setattr(pool, "granted_cores", lambda: 2)
    net = nn.Linear(4, 1)
    seen = []
    out = pool.map_batches(lambda xb: net(xb), [torch.full((2, 4), float(i)) for i in range(5)],
                           torch.device("cpu"), progress=lambda b: seen.append(int(b[0, 0])))
    assert seen == [0, 1, 2, 3, 4] and all(not o.requires_grad for o in out)
    slope = float(net.weight.detach().sum())
    assert [round(float(o[0, 0] - net.bias.detach()), 4) for o in out] == [round(i * slope, 4) for i in range(5)]


def test_an_error_in_a_batch_reaches_the_caller(monkeypatch):
    monkeypatch.setattr(pool, "granted_cores", lambda: 2)

    def fail(b):
        raise ValueError(f"bad batch {b}")
    with pytest.raises(ValueError, match="bad batch"):
        pool.map_batches(fail, [1, 2, 3], torch.device("cpu"))


def _train_fp32(out, threads: int) -> None:
    res = subprocess.run([sys.executable, "-m", "vae_cli", "train", "recipes/digits.yaml", "epochs=2", "--precision",
                          "fp32", "--device", "cpu", "--quiet", "--out", str(out), "--name", f"t{threads}"], cwd=ROOT,
                         capture_output=True, text=True, env={**os.environ, "VAE_THREADS": str(threads)})
    assert res.returncode == 0, res.stderr


def test_a_finish_on_one_or_two_cores_writes_the_same_weights_file(tmp_path):
    """fp32 (the AMD boxes' precision): the knn reference features, a tensor of the weights file, came out 1e-6
    apart when the finish had one core (another job beside it) instead of two; so did the calibration."""
    for threads in (1, 2):
        _train_fp32(tmp_path, threads)
    a, b = tmp_path / "t1" / "model.safetensors", tmp_path / "t2" / "model.safetensors"
    assert _same(a, b) == []
    meta = [safe_open(str(p), "pt").metadata() for p in (a, b)]
    assert json.loads(meta[0]["reject"]) == json.loads(meta[1]["reject"])
    ma, mb = (json.loads(m["metrics"]) for m in meta)
    ma.pop("train_seconds"), mb.pop("train_seconds")
    assert ma == mb


@pytest.mark.parametrize("name", ["hvae", "m2h"])
def test_a_ladders_classifier_stage_fits_the_same_on_one_or_two_cores(monkeypatch, name):
    """The codes' pass of the classifier stage (its class densities are saved) runs in one-thread batches too."""
    from tests.test_hvae import _hvae

    x = torch.rand(1100, 3, 16, 16, generator=torch.Generator().manual_seed(0))  # 3 batches of 512
    y = torch.arange(1100) % 4

    def fitted(cores: int) -> dict[str, torch.Tensor]:
        monkeypatch.setattr(pool, "granted_cores", lambda: cores)
        model = _hvae(name=name, **({"decoder_width": 16, "latent_levels": 2} if name == "m2h" else {}))
        model.fit_classifier(x, y, 5, 64)
        return {k: v.clone() for k, v in model.state_dict().items()}
    one, two = fitted(1), fitted(2)
    assert one["code_noise"].gt(0).all()
    assert all(torch.equal(one[k], two[k]) for k in one), [k for k in one if not torch.equal(one[k], two[k])]
