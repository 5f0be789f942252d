"""The package's contracts: the registry helper, registry-backed recipe keys, the typed run folder and
training result, keys that reach what they name, and a library that leaves global state as it found it."""

from __future__ import annotations

import io
import random
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from vae_cli.artifacts.rundir import PICTURES, RunDir
from vae_cli.core import recipe as R
from vae_cli.core.console import Reporter
from vae_cli.core.errors import RecipeError
from vae_cli.core.registry import Registry
from vae_cli.evaluation import catalog

from .conftest import TINY


def test_registry_refuses_duplicates_and_suggests_close_names():
    reg: Registry[int] = Registry("widget", "model.widget")
    reg.add("resnet", 1)
    reg.register("small")(2)
    with pytest.raises(ValueError, match="registered twice"):
        reg.add("small", 3)
    assert reg.names() == ["resnet", "small"] and "small" in reg and reg.get("small") == 2
    with pytest.raises(RecipeError, match=r"unknown widget 'model.widget=resnt': must be one of resnet, small; "
                                          r"did you mean 'resnet'\?"):
        reg.get("resnt")


def test_registry_backed_keys_follow_the_registry(monkeypatch):
    """A backbone registered at run time is accepted by the recipe and listed by `vae info --defaults`,
    with no list written anywhere else."""
    from vae_cli.models import nets

    assert "extra" not in R.defaults_yaml()
    with pytest.raises(RecipeError, match="unknown backbone 'model.backbone=extra'"):
        R.load(None, ["model.backbone=extra"])
    monkeypatch.setitem(nets.BACKBONES._entries, "extra", nets.Backbone(nets.Encoder, nets.Decoder))
    assert R.load(None, ["model.backbone=extra"]).model.backbone == "extra"
    assert "| extra" in R.defaults_yaml() or "[deep | extra" in R.defaults_yaml()


def test_model_width_is_refused_where_no_network_has_channels():
    with pytest.raises(RecipeError, match="model.width=64 does not apply to the mlp backbone"):
        R.load(None, ["model.backbone=mlp", "model.width=64"])
    assert R.load(None, ["model.backbone=small", "model.decoder=mlp", "model.width=64"]).model.width == 64


def test_run_dir_names_every_file_once(tmp_path):
    run = RunDir.create(tmp_path, "x", exist_ok=False)
    again = RunDir.create(tmp_path, "x", exist_ok=False)
    assert run.root == tmp_path / "x" and again.root == tmp_path / "x-2"
    assert run.weights.name == "model.safetensors" and run.state.name == "last.safetensors"
    assert run.lock.name == ".lock" and run.metrics.name == "metrics.csv" and run.recipe.name == "recipe.yaml"
    assert {run.picture(k).name for k in PICTURES} == set(PICTURES.values())
    assert RunDir.of_weights(run.weights) == run


def test_catalog_orders_stdout_and_report_rows():
    res = {"n": 3, "accuracy": 0.5, "macro_f1": 0.25, "ece": 0.1, "elbo": -1.5, "recon": 1.0, "kl": 0.5,
           "active_units": 2, "latent_dim": 4, "nll": None, "probe": {"labels_per_class": 2, "linear_accuracy": 0.75,
                                                                    "knn_accuracy": 0.5, "knn_k": 3}}
    rows = catalog.summary_rows(res)
    assert rows[0] == ("images", "3") and ("active units", "2 of 4") in rows
    assert rows[-2:] == [("linear probe (2 labels/class)", "0.7500"), ("3-NN (2 labels/class)", "0.5000")]
    assert not any(label.startswith("NLL") for label, _ in rows)  # nll is null: no row


class _Logs(Reporter):
    def __init__(self):
        super().__init__(quiet=False, stream=io.StringIO())


def test_training_reaches_the_strong_view_reports_the_optimizer_and_restores_global_state(tmp_path, monkeypatch):
    """One short M2 run with consistency training:
    - train.augment_flip reaches the consistency term's strong view (it once never did);
    - a missing fused AdamW kernel is said on stderr, not silently replaced;
    - the caller's RNGs and warning filters are as they were before `train()`."""
    from vae_cli.engine import loop, step, train

    seen = []
    real_strong = step.strong
    monkeypatch.setattr(step, "strong", lambda x, flip=False: seen.append(flip) or real_strong(x, flip=flip))
    real_adamw = torch.optim.AdamW

    def no_fused(params, **kw):
        if kw.get("fused"):
            raise RuntimeError("no fused kernel here")
        return real_adamw(params, **kw)

    monkeypatch.setattr(loop.torch.optim, "AdamW", no_fused)
    r = R.load(TINY, ["train.device=cpu", "epochs=1", "model.name=m2", "train.head_steps=0", "model.decoder=mlp",
                      "model.consistency=1",
                      "model.threshold=0", "train.augment_flip=true", "data.labels_per_class=3"])
    torch.manual_seed(123)
    random.seed(5)
    np.random.seed(7)
    before = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    logs = _Logs()
    result = train.train(r, out=tmp_path, name="m2", reporter=logs)
    assert seen and all(seen), "train.augment_flip did not reach the strong view"
    assert "no fused AdamW kernel" in logs.stream.getvalue()
    assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]
    assert np.array_equal(np.random.get_state()[1], before[2])
    ours = [f for f in warnings.filters if f[1] is not None and ("Grad strides" in f[1].pattern
                                                                  or "lr_scheduler" in f[1].pattern)]
    assert not ours, "the loop's warning filters leaked out of train()"  # (imported libraries may add their own)
    out = result.to_json()
    assert out["paths"]["weights"] == str(tmp_path / "m2" / "model.safetensors") and out["rank"] == 0
    assert {"run_dir", "device", "precision", "epochs", "test", "rank_checksums", "reject"} <= set(out)
    # where the time after the loop went, stage by stage, in the JSON and on the log
    assert list(out["finish_seconds"]) == ["classifier", "evaluation", "calibration", "weights and pictures"]
    assert all(v >= 0 for v in out["finish_seconds"].values())
    assert "after the loop: classifier" in logs.stream.getvalue()


def test_pillow_limits_are_set_only_while_decoding(tmp_path):
    from vae_cli.data import images

    before = Image.MAX_IMAGE_PIXELS
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    seen = []
    real_open = Image.open

    def spy(*a, **kw):
        seen.append(Image.MAX_IMAGE_PIXELS)
        return real_open(*a, **kw)

    Image.open = spy
    try:
        images.load_image(tmp_path / "a.png", 3, (4, 4))
    finally:
        Image.open = real_open
    assert seen == [2 * images.MAX_PIXELS] and before == Image.MAX_IMAGE_PIXELS


def test_every_training_step_runs_in_training_mode(tmp_path, monkeypatch):
    """The per-epoch evaluation switches the model to eval mode; every later epoch must switch it back
    (once it did not: epochs 2+ ran without dropout and with frozen batch-norm statistics)."""
    from vae_cli.engine import train
    from vae_cli.models.vae import VAE

    modes = []
    real = VAE.loss
    monkeypatch.setattr(VAE, "loss", lambda self, batch, kl: modes.append(self.training) or real(self, batch, kl))
    r = R.load(TINY, ["train.device=cpu", "epochs=3"])
    train.train(r, out=tmp_path, name="modes", reporter=Reporter(quiet=True))
    assert len(modes) > 3 and all(modes)
