"""Folder datasets too large for memory stream from disk through a DataLoader with worker processes; the
streamed run must train on exactly the tensors the in-memory run trains on."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.imagegen import write
from vae_cli.cli import app
from vae_cli.core.recipe import DataConfig
from vae_cli.data import build_dataset
from vae_cli.data.streaming import FileImages


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """3 classes x 30 real PNG files of different sizes and modes, in one tree (the test split is held out)."""
    root = tmp_path_factory.mktemp("folder")
    for c, mode in enumerate(("L", "RGB", "P")):
        for i in range(30):
            write(root / f"class{c}" / f"{i:03d}.png", mode, (10 + c * 4, 12 + i % 5), seed=100 * c + i)
    return root


def _cfg(root, limit_gb, **kw):
    return DataConfig(name="folder", root=str(root), image_size=12, channels=1, memory_limit_gb=limit_gb,
                      workers=2, **kw)


def test_streamed_dataset_decodes_to_the_same_tensors(folder):
    mem, lazy = build_dataset(_cfg(folder, 100.0), 0), build_dataset(_cfg(folder, 0.0), 0)
    assert isinstance(lazy.train_x, FileImages) and isinstance(mem.train_x, torch.Tensor)
    assert lazy.image_shape == mem.image_shape == (1, 12, 12)
    for name in ("train", "test", "holdout"):
        a, b = getattr(lazy, f"{name}_x"), getattr(mem, f"{name}_x")
        assert len(a) == len(b) and torch.equal(a[np.arange(len(a))], b), name
        assert torch.equal(torch.cat(list(a.split(7))), b)  # worker-decoded batches, in order
        assert torch.equal(getattr(lazy, f"{name}_y"), getattr(mem, f"{name}_y"))


def _train(tmp_path, runner, folder, name, *overrides):
    recipe = {"name": name, "data": {"name": "folder", "root": str(folder), "image_size": 12, "channels": 1},
              "model": {"latent_dim": 4, "width": 8, "hidden": 32, "head_hidden": 16},
              "train": {"epochs": 2, "batch_size": 16, "head_steps": 10, "num_samples": 4, "augment_shift": 1}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    res = runner.invoke(app, ["train", str(path), "--out", str(tmp_path / "runs"), "--quiet", "--json",
                              "--device", "cpu", *overrides])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def test_streamed_training_equals_in_memory_training(tmp_path, runner, folder):
    mem = _train(tmp_path, runner, folder, "mem", "data.memory_limit_gb=100")
    streamed = _train(tmp_path, runner, folder, "streamed", "data.memory_limit_gb=0", "data.workers=2")
    a, b = load_file(mem["paths"]["weights"]), load_file(streamed["paths"]["weights"])
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    assert mem["test"]["accuracy"] == streamed["test"]["accuracy"]


def test_streaming_without_workers_and_resume(tmp_path, runner, folder):
    """workers=0 decodes in the training process; a finished run resumed is a no-op that keeps its weights."""
    first = _train(tmp_path, runner, folder, "w0", "data.memory_limit_gb=0", "data.workers=0")
    before = load_file(first["paths"]["weights"])
    again = _train(tmp_path, runner, folder, "w0", "data.memory_limit_gb=0", "data.workers=0", "--resume")
    after = load_file(again["paths"]["weights"])
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_binarize_needs_memory(tmp_path, runner, folder):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"data": {"name": "folder", "root": str(folder), "binarize": "threshold",
                                               "memory_limit_gb": 0}}))
    res = runner.invoke(app, ["train", str(recipe), "--out", str(tmp_path / "runs")])
    assert res.exit_code == 2 and "data.memory_limit_gb" in res.stderr and "Traceback" not in res.output


def test_a_bad_file_found_while_streaming_is_one_line(tmp_path, runner, folder):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(folder, root)
    (root / "class1" / "007.png").write_bytes(b"not a png")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"data": {"name": "folder", "root": str(root), "image_size": 12,
                                               "memory_limit_gb": 0, "workers": 1},
                                      "model": {"latent_dim": 4, "width": 8, "hidden": 32},
                                      "train": {"epochs": 1, "batch_size": 16}}))
    res = runner.invoke(app, ["train", str(recipe), "--out", str(tmp_path / "runs"), "--quiet"])
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1, res.stderr
    assert "007.png' is not an image" in lines[0] and "Traceback" not in res.stderr


@pytest.mark.parametrize("threads, workers", [("1", 1), ("3", 2), ("9", 4)])
def test_the_cpu_budget_sets_the_streaming_workers(folder, monkeypatch, threads, workers):
    """data.workers unset: the DataLoader processes follow --threads / VAE_THREADS (cores - 1, 1 to 4)."""
    monkeypatch.setenv("VAE_THREADS", threads)
    cfg = DataConfig(name="folder", root=str(folder), image_size=12, channels=1, memory_limit_gb=0.0)
    assert build_dataset(cfg, 0).train_x.workers == workers
