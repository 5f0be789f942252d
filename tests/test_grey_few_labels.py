"""The grey few-label recipe (recipes/mnist-100-labels.yaml) with the photo recipes' mechanisms it adopted in
session 14: a moving average of the weights, pseudo-label alignment and whole-pixel shifts (1.78% -> 1.35%
MNIST-100 test error over 3 subsets; BENCHMARKS.md). Run here on the embedded 8x8 digits, which need no
download: the recipe's training as shipped, on a smaller net, trains and beats chance clearly (that the
averaged weights are what is saved: tests/test_photos.py)."""

from __future__ import annotations

import pytest

from vae_cli.core import recipe as R
from vae_cli.core.console import Reporter
from vae_cli.engine.train import train

from .conftest import ROOT

RECIPE = ROOT / "recipes" / "mnist-100-labels.yaml"


@pytest.fixture(scope="module")
def grey_run(tmp_path_factory):
    # its training keys as shipped; a narrower net, a 1-pixel shift and 64-image batches for 8x8 images on 2 cores
    r = R.load(RECIPE, ["data.name=digits", "data.test_fraction=0.2", "data.holdout_fraction=0.0", "epochs=8",
                        "model.width=16", "model.hidden=128", "train.augment_shift=1", "train.batch_size=64",
                        "train.device=cpu", "train.precision=fp32"])
    out = tmp_path_factory.mktemp("grey")
    return r, train(r, out=out, name="mnist-100-on-digits", reporter=Reporter(quiet=True))


def test_the_saved_weights_are_the_moving_average_the_recipe_asks_for(grey_run):
    """The recipe's moving average is in action: the saved model is the average the state file carries, not the
    last step's weights (the alignment and whole-pixel shifts: tests/test_photos.py)."""
    import torch
    from safetensors.torch import load_file

    r, res = grey_run
    assert r.train.ema > 0 and r.model.align and r.train.augment_crop
    saved = load_file(res.paths["weights"])
    state = load_file(str(res.run.state))
    params = [k for k in saved if f"ema.{k}" in state]
    assert params, "the state has no moving average"
    assert all(torch.equal(saved[k], state[f"ema.{k}"]) for k in params)
    assert any(not torch.equal(saved[k], state[f"model.{k}"]) for k in params)


def test_the_grey_recipe_trains_on_digits_with_ten_labels_a_class(grey_run):
    r, res = grey_run
    assert r.data.labels_per_class == 10
    assert res.epochs == 8
    assert res.test["accuracy"] > 0.7, res.test["accuracy"]  # chance is 0.1; 0.89 measured (8 epochs, 8 s)
