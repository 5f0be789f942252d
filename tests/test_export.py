"""`vae export`: every registered model's classifier, encoder and decoder as ONNX (run by onnxruntime)
and TorchScript (run in a fresh process), against the PyTorch model on real digit images."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from tests.conftest import TINY
from vae_cli.artifacts.export import PARTS, reference_inputs, torch_outputs
from vae_cli.cli import app
from vae_cli.core.recipe import ModelConfig
from vae_cli.core.recipe_rules import model_keys
from vae_cli.models import REGISTRY

ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, runner):
    """One tiny model per registered name (one epoch), trained through the CLI."""
    out, made = tmp_path_factory.mktemp("export-runs"), {}

    def get(name: str):
        if name not in made:
            # M2 with its photo options on: the mirror-image vote and the rotation head travel into the graph
            extra = ["model.test_flip=true", "model.rotation=10"] if name == "m2" else []
            # the tiny recipe's sizes a model does not read go back to their defaults (else they are refused)
            extra += [f"model.{k}={getattr(ModelConfig, k)}" for k in ("latent_dim", "hidden", "width")
                      if k not in model_keys(name)]
            extra += [] if REGISTRY.get(name).fits_head else ["train.head_steps=0"]  # no classifier stage after it
            res = runner.invoke(app, ["train", str(TINY), "--out", str(out), "--name", name, "--quiet",
                                      f"model.name={name}", "epochs=1", "data.holdout_fraction=0", *extra])
            assert res.exit_code == 0, res.output
            made[name] = out / name / "model.safetensors"
        return made[name]
    return get


def _real_inputs(weights, part: str, n: int):
    from vae_cli.artifacts import checkpoint
    from vae_cli.data import build_dataset

    model, meta = checkpoint.load(weights, torch.device("cpu"))
    r = meta["recipe_obj"]
    images = build_dataset(r.data, r.seed, read_only=True).test_x[:n]
    inputs = reference_inputs(model, part, images)
    return model, meta, inputs, torch_outputs(model, part, inputs)


@pytest.mark.parametrize("name", sorted(REGISTRY))
@pytest.mark.parametrize("part", PARTS)
def test_onnx_matches_pytorch_in_onnxruntime(trained, runner, tmp_path, name, part):
    weights = trained(name)
    path = tmp_path / f"{name}-{part}.onnx"
    res = runner.invoke(app, ["export", str(weights), "--part", part, "-o", str(path), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["max_abs_diff"] < 1e-4 and out["path"] == str(path)
    model, meta, inputs, want = _real_inputs(weights, part, 37)  # another batch size than the export's 2
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {i.name: t.numpy() for i, t in zip(sess.get_inputs(), inputs)})
    diff = max(float(np.abs(g - w.numpy()).max()) for g, w in zip(got, want))
    assert diff < 1e-4, diff
    props = sess.get_modelmeta().custom_metadata_map
    assert json.loads(props["classes"]) == meta["classes"] and props["part"] == part
    assert (int(props["channels"]), int(props["height"]), int(props["width"])) == tuple(meta["image_shape"])
    if part == "classifier":
        assert got[0].shape == (37, 10) and np.allclose(got[0].sum(1), 1, atol=1e-5)
    if part == "encoder":
        assert [o.name for o in sess.get_outputs()] == ["mean", "logvar"]
    if part == "decoder":
        assert got[0].shape == (37, 1, 8, 8)
        takes_class = [i.name for i in sess.get_inputs()] == ["z", "y"]
        assert takes_class == (name in ("m2", "m2h"))  # M2 and M2H decode (z, y); the others z alone


@pytest.mark.parametrize("name", ["vae", "m2"])
def test_torchscript_runs_in_a_fresh_process(trained, runner, tmp_path, name):
    weights = trained(name)
    path = tmp_path / "cls.torchscript"
    res = runner.invoke(app, ["export", str(weights), "-f", "torchscript", "-o", str(path)])
    assert res.exit_code == 0, res.output
    assert "max |torchscript - torch|" in res.stderr
    model, meta, inputs, want = _real_inputs(weights, "classifier", 25)
    np.save(tmp_path / "x.npy", inputs[0].numpy())
    script = textwrap.dedent(f"""
        import json, numpy as np, torch
        extra = {{"vae.json": ""}}
        m = torch.jit.load({str(path)!r}, _extra_files=extra)
        np.save({str(tmp_path / 'y.npy')!r}, m(torch.from_numpy(np.load({str(tmp_path / 'x.npy')!r}))).numpy())
        print(json.loads(extra["vae.json"])["classes"])  # a JSON list, like the ONNX metadata value
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [str(i) for i in range(10)]  # the class names travel in the file
    got = np.load(tmp_path / "y.npy")
    assert np.abs(got - want[0].numpy()).max() < 1e-5


def test_missing_extra_is_one_clear_line(trained, runner, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # as if `pip install 'vae-cli[export]'` was not run
    res = runner.invoke(app, ["export", str(trained("vae")), "-o", str(tmp_path / "m.onnx")])
    assert res.exit_code == 2 and "Traceback" not in res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'vae-cli[export]'" in lines[0]
    assert not (tmp_path / "m.onnx").exists()


def test_export_does_not_import_onnx_elsewhere():
    code = ("import sys; import vae_cli.cli; import vae_cli.api; "
            "print('onnx' in sys.modules, 'onnxruntime' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "False False", proc.stderr
