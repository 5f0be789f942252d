"""`vae classify --reject`: the likelihood threshold calibrated on held-out training images flags noise,
letters and shapes while passing real digits, on real PNG files."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
from PIL import Image

from tests.conftest import ROOT
from tests.imagegen import outliers
from vae_cli.artifacts.checkpoint import read_metadata
from vae_cli.cli import app


@pytest.fixture(scope="module")
def files(tmp_path_factory, digits_run):
    """100 held-back test digits and 22 outliers (noise, letters, shapes) as PNG files, 4x enlarged."""
    from vae_cli.core.recipe import load
    from vae_cli.data import build_dataset

    root = tmp_path_factory.mktemp("images")
    data = build_dataset(load(digits_run / "recipe.yaml").data, 0)
    digits = []
    for i in range(100):
        img = (data.test_x[i, 0].numpy() * 255).round().astype(np.uint8).repeat(4, 0).repeat(4, 1)
        digits.append(root / "digits" / f"{i:03d}.png")
        digits[-1].parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(digits[-1])
    return {"digits": digits, **outliers(root, (32, 32))}


def _classify(runner, weights, paths, *extra):
    res = runner.invoke(app, ["classify", str(weights), *map(str, paths), "--reject", "-f", "json", *extra])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout), res.stderr


def test_training_stores_the_calibration(digits_run):
    rej = read_metadata(digits_run / "model.safetensors")["reject"]
    assert rej["rate"] == 0.01 and rej["samples"] == 16 and rej["holdout_images"] == 143
    scores = rej["holdout_scores"]
    assert scores == sorted(scores) and len(scores) == 143
    below = sum(s < rej["threshold"] for s in scores) / len(scores)
    assert below <= 0.02  # the 1% quantile of 143 scores
    assert 0.0 <= rej["test_reject_rate"] <= 0.06  # new digits are rejected about as often


def test_rejects_noise_letters_and_shapes_but_not_digits(digits_run, files, runner):
    weights = digits_run / "model.safetensors"
    rates = {}
    for kind, paths in files.items():
        rows, err = _classify(runner, weights, paths)
        assert len(rows) == len(paths) and all("score" in r and "rejected" in r for r in rows)
        rates[kind] = sum(r["rejected"] for r in rows) / len(rows)
        assert f"rejected {sum(r['rejected'] for r in rows)} of {len(rows)}" in err
    assert rates["digits"] <= 0.08, rates
    assert rates["noise"] == 1.0, rates
    assert rates["letters"] >= 0.7 and rates["shapes"] >= 0.7, rates


def test_reject_rate_moves_the_threshold(digits_run, files, runner):
    weights = digits_run / "model.safetensors"
    strict, _ = _classify(runner, weights, files["digits"], "--reject-rate", "0.3")
    loose, _ = _classify(runner, weights, files["digits"], "--reject-rate", "0.001")
    n_strict, n_loose = sum(r["rejected"] for r in strict), sum(r["rejected"] for r in loose)
    assert n_strict > n_loose and 10 <= n_strict <= 50  # ~30% of in-distribution images
    assert [r["score"] for r in strict] == [r["score"] for r in loose]  # same scores, other threshold


def test_reject_in_csv_and_table(digits_run, files, runner):
    weights = str(digits_run / "model.safetensors")
    res = runner.invoke(app, ["classify", weights, str(files["noise"][0]), str(files["digits"][0]), "--reject",
                              "-f", "csv"])
    rows = list(csv.DictReader(io.StringIO(res.stdout)))
    assert [r["rejected"] for r in rows] == ["true", "false"]
    assert float(rows[0]["reject_score"]) < float(rows[1]["reject_score"])
    table = runner.invoke(app, ["classify", weights, str(files["noise"][0]), "--reject"]).stdout
    assert "REJECTED" in table
    plain = runner.invoke(app, ["classify", weights, str(files["noise"][0])]).stdout
    assert "REJECTED" not in plain and "(score" not in plain  # without --reject: as before


def test_reject_without_calibration_is_one_clear_error(tmp_path, runner, files):
    res = runner.invoke(app, ["train", str(ROOT / "recipes" / "tiny.yaml"), "--out", str(tmp_path), "--quiet",
                              "data.holdout_fraction=0", "epochs=1"])
    assert res.exit_code == 0, res.output
    bad = runner.invoke(app, ["classify", str(tmp_path / "tiny" / "model.safetensors"), str(files["noise"][0]),
                              "--reject"])
    assert bad.exit_code == 2
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and "data.holdout_fraction" in lines[0] and "Traceback" not in bad.output
    split = runner.invoke(app, ["eval", str(tmp_path / "tiny" / "model.safetensors"), "--split", "holdout"])
    assert split.exit_code == 2 and "holds no images out" in split.stderr
