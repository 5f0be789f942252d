from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from vae_cli.core import recipe as R
from vae_cli.core.console import Reporter
from vae_cli.engine.train import train

from .conftest import TINY


def _weights(tmp_path, name, *overrides):
    r = R.load(TINY, ["train.device=cpu", "epochs=1", *overrides])
    res = train(r, out=tmp_path, name=name, reporter=Reporter(quiet=True))
    return load_file(res.paths["weights"]), res


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_same_seed_same_weights(tmp_path, precision):
    a, _ = _weights(tmp_path, "a", f"train.precision={precision}")
    b, _ = _weights(tmp_path, "b", f"train.precision={precision}")
    c, _ = _weights(tmp_path, "c", f"train.precision={precision}", "seed=1")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_training_lowers_the_loss_and_learns_to_classify(tmp_path):
    """A short real run on the digits: the ELBO improves over epochs and accuracy beats chance clearly."""
    r = R.load(TINY, ["train.device=cpu", "epochs=15", "data.train_limit=null", "model.likelihood=gaussian",
                      "model.latent_dim=8", "model.width=16", "model.hidden=64", "head_steps=200",
                      "model.head_hidden=64"])
    res = train(r, out=tmp_path, name="learn", reporter=Reporter(quiet=True))
    import csv

    rows = list(csv.DictReader(open(res.paths["metrics"])))
    assert float(rows[-1]["test_elbo"]) > float(rows[0]["test_elbo"])
    assert res.test["accuracy"] > 0.6  # chance is 0.1


def _scaler_state(res) -> dict:
    from safetensors import safe_open

    with safe_open(res.paths["state"], "pt") as f:
        return json.loads(f.metadata()["scaler"])


def test_fp16_uses_a_grad_scaler_and_trains(tmp_path):
    _, res = _weights(tmp_path, "h", "train.precision=fp16")
    assert res.precision == "fp16" and res.test["elbo"] == res.test["elbo"]  # not NaN
    scaler = _scaler_state(res)  # an enabled GradScaler has a live state; a disabled one saves {}
    assert scaler and math.isfinite(scaler["scale"]) and scaler["scale"] > 0 and "_growth_tracker" in scaler
    _, res32 = _weights(tmp_path, "h32", "train.precision=bf16")
    assert _scaler_state(res32) == {}  # bf16 needs no loss scaling


def test_m2_with_few_labels_beats_chance_clearly(tmp_path):
    """End to end: M2 on the digits with 5 labels per class (50 of 1,438) learns from unlabelled images."""
    r = R.load(None, ["train.device=cpu", "data.labels_per_class=5", "model.name=m2", "model.decoder=mlp",
                      "model.width=16", "model.hidden=128", "model.latent_dim=8", "model.head_hidden=0",
                      "model.alpha=10", "model.consistency=1.0", "model.threshold=0.9", "epochs=8",
                      "batch_size=64", "labelled_batch_size=32", "augment_shift=1", "head_steps=0"])
    res = train(r, out=tmp_path, name="m2", reporter=Reporter(quiet=True))
    assert res.test["accuracy"] > 0.6, res.test["accuracy"]  # chance is 0.1
    from vae_cli.artifacts import checkpoint

    tensors = load_file(res.paths["weights"])  # plain tensors, exactly the model's
    model, meta = checkpoint.load(res.paths["weights"])
    assert set(tensors) - {checkpoint.REJECT_REFERENCE} == set(model.state_dict())
    labelled = meta["labelled_indices"]
    assert len(labelled) == 50 and len(set(labelled)) == 50  # 5 per class, no image twice


def test_labelled_indices_are_recorded(tmp_path):
    from vae_cli.artifacts.checkpoint import read_metadata
    from vae_cli.data import build_dataset

    _, res = _weights(tmp_path, "lab", "data.labels_per_class=3")
    meta = read_metadata(res.paths["weights"])
    r = R.load(TINY, ["data.labels_per_class=3"])
    expected = build_dataset(r.data, r.seed).labelled.tolist()
    assert meta["labelled_indices"] == expected and len(expected) == 30


def test_compiled_training_saves_weights_an_uncompiled_model_loads(tmp_path, monkeypatch):
    """train.compile=true goes through torch.compile (aot_eager backend here: the inductor C++ build takes
    over a minute on 2 cores; bench-speed measures it); the file holds plain keys and loads as usual."""
    from vae_cli.artifacts import checkpoint

    monkeypatch.setenv("VAE_COMPILE_BACKEND", "aot_eager")
    from torch._dynamo.utils import counters

    plain, plain_res = _weights(tmp_path, "plain", "train.precision=fp32")
    counters.clear()
    compiled, res = _weights(tmp_path, "compiled", "train.precision=fp32", "train.compile=true")
    assert compiled.keys() == plain.keys() and not any("_orig_mod" in k for k in compiled)
    assert counters["stats"]["unique_graphs"] > 0, "train.compile=true did not go through torch.compile"
    model, _ = checkpoint.load(res.paths["weights"])
    assert not hasattr(model, "_orig_mod")
    loaded = model.state_dict()
    assert set(compiled) - set(loaded) == {checkpoint.REJECT_REFERENCE}  # --reject's held-out features, not weights
    assert all(torch.equal(loaded[k], compiled[k]) for k in loaded)  # what was saved is what loads
    x = torch.rand(4, *model.image_shape)
    with torch.no_grad():
        p = model.predict_proba(x)
    assert p.shape == (4, 10) and torch.allclose(p.sum(1), torch.ones(4))
    # the eager CPU step runs as shards (engine/shards.py), the compiled one as one pass: the same maths summed in
    # another order, so the two trainings agree in what they learn, not bit for bit
    assert plain.keys() == compiled.keys()
    assert abs(plain_res.test["accuracy"] - res.test["accuracy"]) < 0.15, (plain_res.test, res.test)
