"""`vae embed` (.npy/.csv/.parquet, streamed), paths from standard input through the console script, and
the Python API that `classify` and `embed` share."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vae_cli.cli import app


@pytest.fixture(scope="module")
def pngs(tmp_path_factory, digits_run):
    """30 held-back test digits as PNG files (4x enlarged) in a folder."""
    from vae_cli.core.recipe import load
    from vae_cli.data import build_dataset

    root = tmp_path_factory.mktemp("pngs")
    data = build_dataset(load(digits_run / "recipe.yaml").data, 0)
    for i in range(30):
        img = (data.test_x[i, 0].numpy() * 255).round().astype(np.uint8).repeat(4, 0).repeat(4, 1)
        Image.fromarray(img).save(root / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def model(digits_run):
    from vae_cli.api import load

    return load(digits_run / "model.safetensors", device="cpu")


def test_embed_npy_matches_the_model(digits_run, pngs, model, runner, tmp_path):
    out = tmp_path / "z.npy"
    res = runner.invoke(app, ["embed", str(digits_run / "model.safetensors"), str(pngs), "-o", str(out),
                              "--batch-size", "7"])  # 5 batches: the streamed path
    assert res.exit_code == 0, res.output
    z = np.load(out, allow_pickle=False)
    paths = (tmp_path / "z.paths.txt").read_text().splitlines()
    assert z.shape == (30, model.latent_dim) and z.dtype == np.float32
    assert paths == [str(p) for p in sorted(pngs.glob("*.png"))]
    x = model.load_images([pngs])
    with torch.no_grad(), model.runtime.autocast():  # what `embed` runs under (bf16 on CPUs with native bf16)
        want = model.net.latent_means(x).float().numpy()
    # bf16 rounds to ~3 significant digits, and its kernels may group sums differently for a batch of 7 and of 30
    tol = {"rtol": 1e-4, "atol": 1e-5} if model.runtime.precision == "fp32" else {"rtol": 0.05, "atol": 0.05}
    np.testing.assert_allclose(z, want, **tol)
    assert "wrote 30 embeddings" in res.stderr
    assert not list(tmp_path.glob(".vae-tmp-*"))  # nothing half-written left behind


def test_embed_logvar_csv_and_npy_agree(digits_run, pngs, runner, tmp_path):
    w = str(digits_run / "model.safetensors")
    for name in ("e.csv", "e.npy"):
        res = runner.invoke(app, ["embed", w, str(pngs), "-o", str(tmp_path / name), "--logvar"])
        assert res.exit_code == 0, res.output
    rows = list(csv.reader((tmp_path / "e.csv").open()))
    arr = np.load(tmp_path / "e.npy")
    d = arr.shape[1] // 2
    assert rows[0] == ["path"] + [f"z{i}" for i in range(d)] + [f"logvar{i}" for i in range(d)]
    assert len(rows) == 31 and rows[1][0].endswith("000.png")
    np.testing.assert_allclose(np.array([r[1:] for r in rows[1:]], float), arr, rtol=1e-5, atol=1e-6)
    assert (arr[:, d:] < 0).mean() > 0.5  # log-variances: posteriors narrower than the prior


def test_embed_parquet(digits_run, pngs, runner, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    out = tmp_path / "e.parquet"
    res = runner.invoke(app, ["embed", str(digits_run / "model.safetensors"), str(pngs), "-o", str(out)])
    assert res.exit_code == 0, res.output
    table = pq.read_table(out)
    assert table.num_rows == 30 and table.column_names[0] == "path" and table.column_names[1] == "z0"
    npy = tmp_path / "e.npy"
    runner.invoke(app, ["embed", str(digits_run / "model.safetensors"), str(pngs), "-o", str(npy)])
    got = np.stack([table.column(c).to_numpy() for c in table.column_names[1:]], 1)
    np.testing.assert_allclose(got, np.load(npy), rtol=1e-6)


def test_embed_bad_inputs(digits_run, pngs, runner, tmp_path):
    w = str(digits_run / "model.safetensors")
    bad = runner.invoke(app, ["embed", w, str(pngs), "-o", str(tmp_path / "z.txt")])
    assert bad.exit_code == 2 and ".npy, .csv, .parquet" in bad.stderr and not (tmp_path / "z.txt").exists()
    (tmp_path / "broken.png").write_bytes(b"nope")
    res = runner.invoke(app, ["embed", w, str(pngs / "000.png"), str(tmp_path / "broken.png"), "-o",
                              str(tmp_path / "z.csv")])
    assert res.exit_code == 2 and "broken.png" in res.stderr and "Traceback" not in res.output
    assert len(list(csv.reader((tmp_path / "z.csv").open()))) == 2  # the good image is still written


def _console(args: list[str], stdin: str) -> subprocess.CompletedProcess:
    script = Path(sys.executable).with_name("vae")
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "vae_cli"]
    return subprocess.run(cmd + args, input=stdin, capture_output=True, text=True, timeout=120)


def test_paths_from_standard_input(digits_run, pngs, tmp_path):
    w = str(digits_run / "model.safetensors")
    files = sorted(pngs.glob("*.png"))[:5]
    listing = "".join(f"{p}\n" for p in files) + "\n"  # a trailing blank line is ignored
    res = _console(["classify", w, "-", "--format", "csv"], listing)
    assert res.returncode == 0, res.stderr
    rows = list(csv.DictReader(res.stdout.splitlines()))
    assert [r["path"] for r in rows] == [str(p) for p in files]
    direct = _console(["classify", w, *map(str, files), "--format", "csv"], "")
    assert direct.stdout == res.stdout
    emb = _console(["embed", w, "-", "-o", str(tmp_path / "z.npy")], listing)
    assert emb.returncode == 0, emb.stderr
    assert np.load(tmp_path / "z.npy").shape[0] == 5
    empty = _console(["classify", w, "-"], "")
    assert empty.returncode == 2 and "standard input was empty" in empty.stderr


def test_python_api(digits_run, pngs, model, runner):
    assert model.classes == [str(i) for i in range(10)] and model.image_shape == (1, 8, 8)
    rows, failures = model.classify([pngs], top_k=2)
    assert not failures and len(rows) == 30 and len(rows[0]["top"]) == 2
    cli = runner.invoke(app, ["classify", str(digits_run / "model.safetensors"), str(pngs), "-k", "2", "-f", "json"])
    assert json.loads(cli.stdout) == rows  # one path: the CLI prints what the API returns
    x = model.load_images([pngs])
    probs = model.predict_proba(x)
    assert probs.shape == (30, 10) and torch.allclose(probs.sum(1), torch.ones(30), atol=1e-5)
    assert [r["top"][0]["class"] for r in rows] == [model.classes[i] for i in probs.argmax(1).tolist()]
    mu, lv = model.embed(x)
    assert mu.shape == lv.shape == (30, model.latent_dim)
    a, b = model.sample(6, cls="3", seed=1), model.sample(6, cls="3", seed=1)
    assert a.shape == (6, 1, 8, 8) and torch.equal(a, b) and a.min() >= 0 and a.max() <= 1
    assert not torch.equal(a, model.sample(6, cls="3", seed=2))
    assert model.reconstruct(x[:4]).shape == (4, 1, 8, 8)
    from vae_cli.core.errors import UsageError

    with pytest.raises(UsageError, match="shape"):
        model.predict_proba(torch.zeros(2, 3, 8, 8))
    with pytest.raises(UsageError, match="not one of the model's classes"):
        model.sample(2, cls="cat")
