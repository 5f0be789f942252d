"""`vae calibrate`: the --reject calibration measured again without retraining. The model's tensors and the
rest of the metadata stay as they were; a file from before the knn score gains it; the new default score and
rate are what `classify --reject` then uses; bad requests are one line, exit 2, and leave the file alone."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from vae_cli.artifacts import checkpoint
from vae_cli.cli import app
from vae_cli.evaluation import reject


def _older(src, dst):
    """`src` as a file from before the knn score: no knn values, no features tensor."""
    meta = checkpoint.read_metadata(src)
    cal = meta["reject"]
    cal = {**cal, "components": {n: v for n, v in cal["components"].items() if n != "knn"},
           "test_reject_rates": {n: v for n, v in cal["test_reject_rates"].items() if n != "knn"}}
    cal.pop("knn_k", None)
    checkpoint.replace_calibration(src, dst, cal, None)


def _scores_row(runner, path) -> str:
    """The scores `vae info` lists for a weights file."""
    res = runner.invoke(app, ["info", str(path)], env={"COLUMNS": "400"})
    assert res.exit_code == 0, res.output
    row = next(line for line in res.stdout.splitlines() if line.startswith("--reject scores"))
    return row.removeprefix("--reject scores").strip()


def test_an_older_file_gains_knn_and_keeps_its_weights(digits_run, tmp_path, runner):
    old = tmp_path / "old.safetensors"
    _older(digits_run / "model.safetensors", old)
    assert "reject.reference" not in load_file(str(old))
    assert _scores_row(runner, old) == "complexity, confidence, energy, likelihood"
    before = load_file(str(old))
    meta_before = checkpoint.read_metadata(old)
    res = runner.invoke(app, ["calibrate", str(old), "--reject-rate", "0.05", "--reject-score", "knn", "--json",
                              "--device", "cpu", "--precision", "auto"])  # as trained (bf16 on native-bf16 CPUs)
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["score"] == "knn" and out["rate"] == 0.05 and out["knn_k"] >= 1
    after = load_file(str(old))
    assert after.pop("reject.reference").shape[0] == out["holdout_images"]
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    meta = checkpoint.read_metadata(old)
    assert {k: v for k, v in meta.items() if k != "reject"} == {k: v for k, v in meta_before.items() if k != "reject"}
    assert "knn" in meta["reject"]["components"]
    assert _scores_row(runner, old) == "complexity, confidence, energy, knn, likelihood"
    # likelihood and complexity are measured with the same seeds as at training: the same held-out values
    for n in ("likelihood", "complexity"):
        assert meta["reject"]["components"][n] == pytest.approx(meta_before["reject"]["components"][n], rel=1e-5)
    model, full = checkpoint.load(old)
    g = reject.gate(full)
    assert g.name == "knn" and g.rate == 0.05 and g.reference is not None
    assert g.threshold == pytest.approx(reject.threshold_of(meta["reject"], "knn", 0.05))


def test_output_elsewhere_leaves_the_input_alone(digits_run, tmp_path, runner):
    src = tmp_path / "in.safetensors"
    shutil.copy(digits_run / "model.safetensors", src)
    raw = src.read_bytes()
    res = runner.invoke(app, ["calibrate", str(src), "-o", str(tmp_path / "out.safetensors"), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert src.read_bytes() == raw
    assert "--reject combined <" in res.stdout and "held-out images" in res.stdout
    assert checkpoint.read_metadata(tmp_path / "out.safetensors")["reject"]["score"] == "combined"


@pytest.mark.parametrize("args, message", [
    (["--reject-score", "knnn"], "knn"),
    (["--reject-score", "rotation"], "model.rotation"),
    (["--reject-rate", "0.9"], "0.5"),
])
def test_bad_requests_are_one_line_and_change_nothing(digits_run, tmp_path, runner, args, message):
    src = tmp_path / "in.safetensors"
    shutil.copy(digits_run / "model.safetensors", src)
    raw = src.read_bytes()
    res = runner.invoke(app, ["calibrate", str(src), *args, "--device", "cpu"])
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output
    assert src.read_bytes() == raw and sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors"]


def test_a_changed_dataset_is_refused(digits_run, tmp_path, runner):
    """The held-out split is rebuilt from the recipe; if it no longer has the size it had, some of its images
    may have been trained on, so the calibration would be biased: refused, file untouched."""
    src = tmp_path / "in.safetensors"
    meta = checkpoint.read_metadata(digits_run / "model.safetensors")
    checkpoint.replace_calibration(digits_run / "model.safetensors", src,
                                   {**meta["reject"], "holdout_images": meta["reject"]["holdout_images"] + 5})
    raw = src.read_bytes()
    res = runner.invoke(app, ["calibrate", str(src), "--device", "cpu"])
    assert res.exit_code == 2, res.output
    assert "training data changed" in res.output and src.read_bytes() == raw
