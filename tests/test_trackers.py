"""`train.loggers`: TensorBoard event files read back with tensorboard's reader, and an MLflow run read
back with MLflow's client from a local file store."""

from __future__ import annotations

import csv
import json
import sys

import pytest

from tests.conftest import TINY
from vae_cli.cli import app


def _metrics(run):
    return list(csv.DictReader((run / "metrics.csv").open()))


def test_tensorboard_event_files(tmp_path, runner):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    res = runner.invoke(app, ["train", str(TINY), "--out", str(tmp_path), "--quiet",
                              "train.loggers=[csv, tensorboard]"])
    assert res.exit_code == 0, res.output
    run = tmp_path / "tiny"
    ea = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    ea.Reload()
    tags = ea.Tags()
    rows = _metrics(run)
    loss = ea.Scalars("train_loss")
    assert [e.step for e in loss] == [1, 2]
    assert [e.value for e in loss] == pytest.approx([float(r["train_loss"]) for r in rows], rel=1e-6)
    assert "test_elbo" in tags["scalars"] and "final/accuracy" in tags["scalars"]
    assert "samples" in tags["images"] and len(tags["images"]) >= 2
    text = ea.Tensors("recipe/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "latent_dim: 4" in text


def test_mlflow_run_on_a_file_store(tmp_path, runner, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    res = runner.invoke(app, ["train", str(TINY), "--out", str(tmp_path / "runs"), "--quiet", "--json",
                              "train.loggers=[mlflow]", "model.latent_dim=5"])
    assert res.exit_code == 0, res.output
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("tiny")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    r = runs[0]
    assert r.info.status == "FINISHED" and r.info.run_name == "tiny"
    assert r.data.params["model.latent_dim"] == "5" and r.data.params["train.epochs"] == "2"
    assert json.loads(r.data.params["train.loggers"]) == ["mlflow"]
    hist = client.get_metric_history(r.info.run_id, "train_loss")
    rows = _metrics(tmp_path / "runs" / "tiny")
    assert [m.step for m in hist] == [1, 2]
    assert [m.value for m in hist] == pytest.approx([float(x["train_loss"]) for x in rows], rel=1e-6)
    assert r.data.metrics["test_accuracy"] == pytest.approx(json.loads(res.stdout)["test"]["accuracy"])
    arts = {a.path for a in client.list_artifacts(r.info.run_id)}
    assert {"model.safetensors", "report.html", "metrics.csv", "pictures"} <= arts
    assert (tmp_path / "runs" / "tiny" / "mlflow-run-id.txt").read_text().strip() == r.info.run_id


def test_missing_tracker_stops_before_training(tmp_path, runner, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)
    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)
    res = runner.invoke(app, ["train", str(TINY), "--out", str(tmp_path), "train.loggers=[mlflow]"])
    assert res.exit_code == 2 and "Traceback" not in res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'vae-cli[mlflow]'" in lines[0]
    assert not (tmp_path / "tiny").exists()


def test_unknown_tracker_is_a_recipe_error(tmp_path, runner):
    res = runner.invoke(app, ["train", str(TINY), "--out", str(tmp_path), "train.loggers=[tensorbord]"])
    assert res.exit_code == 2 and "did you mean 'tensorboard'" in res.stderr
    res = runner.invoke(app, ["train", str(TINY), "--out", str(tmp_path), "train.loggers=tensorboard"])
    assert res.exit_code == 2 and "must be a list" in res.stderr
