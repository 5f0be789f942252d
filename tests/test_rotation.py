"""The self-supervised rotation task of M2 (`model.rotation`) and its `--reject` score: the turns are the
ones claimed and repeat from the seed, the head learns and travels in the weights file, and the score
ranks upright photos above the same photos turned a quarter."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from tests.imagegen import photo_folder
from vae_cli.cli import app
from vae_cli.core.recipe import ModelConfig
from vae_cli.evaluation import reject
from vae_cli.models import build_model
from vae_cli.models.base import Batch
from vae_cli.models.m2 import random_turns

from .test_photos import PHOTO


@pytest.mark.parametrize("shape", [(3, 16, 16), (3, 12, 20)], ids=["square", "wide"])
def test_random_turns_are_the_ones_reported_and_seeded(shape):
    x = torch.rand(64, *shape)
    torch.manual_seed(5)
    out, turns = random_turns(x)
    torch.manual_seed(5)
    again, turns2 = random_turns(x)
    assert torch.equal(out, again) and torch.equal(turns, turns2)
    for i, k in enumerate(turns.tolist()):  # turning back by the reported index gives the image again
        assert torch.equal(torch.rot90(out[i], -k, (1, 2)), x[i])
    seen = set(turns.tolist())
    assert seen == ({0, 1, 2, 3} if shape[1] == shape[2] else {0, 2})  # a wide image is never stood upright


def test_rotation_term_trains_its_head_and_is_off_by_default():
    cfg = dict(name="m2", backbone="resnet", decoder="mlp", width=8, hidden=32, latent_dim=4, head_hidden=0,
               likelihood="logistic", unlabelled_elbo_images=4)
    x, y = torch.rand(8, 3, 16, 16), torch.randint(0, 3, (8,))
    batch = Batch(x, y, torch.zeros(8, dtype=torch.bool), x[:4], y[:4])
    plain = build_model(ModelConfig(**cfg), (3, 16, 16), 3)
    assert "rotation" not in plain.loss(batch, 1.0) and plain.upright_logp(x) is None
    torch.manual_seed(0)
    model = build_model(ModelConfig(rotation=100.0, **cfg), (3, 16, 16), 3)
    terms = model.loss(batch, 1.0)
    assert torch.isfinite(terms["rotation"])
    terms["loss"].backward()
    assert model.rotation_head.weight.grad.abs().sum() > 0
    # trained on the rotation task alone for a few steps, the head tells turned images from upright ones
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    pics = torch.zeros(32, 3, 16, 16)
    pics[:, :, :6] = torch.rand(32, 3, 1, 1)  # a coloured top band over a dark ground, each its own colour
    for _ in range(60):
        xr, turns = random_turns(pics)
        loss = torch.nn.functional.cross_entropy(model.rotation_head(model.trunk(xr)), turns)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        assert (model.upright_logp(pics) > model.upright_logp(pics.flip(2))).float().mean() > 0.9


@pytest.fixture(scope="module")
def rotation_run(tmp_path_factory, runner):
    """A small colour-photo M2 trained with the rotation task; the test photos with an orientation (bars stand
    upright, bands run one diagonal way; a disc has none) and their copies turned a quarter."""
    root = tmp_path_factory.mktemp("rotphotos")
    photo_folder(root, 40, "train")
    test_files = photo_folder(root, 10, "test", seed=1)
    oriented = [f for f in test_files if f.parent.name != "disc"]
    turned = root / "turned"
    turned.mkdir()
    for i, f in enumerate(oriented):
        Image.open(f).convert("RGB").transpose(Image.Transpose.ROTATE_90).save(turned / f"{i:03d}.png")
    out = tmp_path_factory.mktemp("rotrun")
    res = runner.invoke(app, ["train", "recipes/folder-example.yaml", *PHOTO, f"data.root={root}", "epochs=10",
                              "model.rotation=3000", "--out", str(out), "--name", "rot", "--device", "cpu",
                              "--precision", "fp32", "--json", "--quiet"])
    assert res.exit_code == 0, res.output
    return out / "rot" / "model.safetensors", oriented, turned


def test_rotation_score_is_calibrated_and_joins_the_default(rotation_run):
    from vae_cli.artifacts.checkpoint import read_metadata

    cal = read_metadata(rotation_run[0])["reject"]
    assert set(cal["components"]) == set(reject.BASE)  # rotation's held-out values travel with the others
    assert set(cal["test_reject_rates"]) == set(reject.SCORES.names())
    held = reject.held_sorted(cal)
    base = {n: torch.tensor(v, dtype=torch.float64) for n, v in cal["components"].items()}
    with_rot = reject.values("combined", base, held, in_sample=True)
    without = reject.values("combined", base, {n: v for n, v in held.items() if n != "rotation"}, in_sample=True)
    assert not torch.allclose(with_rot, without)  # the rotation p-value is part of the default score


def test_rotation_score_ranks_upright_above_turned(rotation_run, runner):
    weights, oriented, turned = rotation_run
    scores = {}
    for name, paths in (("upright", [str(f) for f in oriented]), ("turned", [str(turned)])):
        res = runner.invoke(app, ["classify", str(weights), *paths, "-f", "json", "--reject-score", "rotation"])
        assert res.exit_code == 0, res.output
        scores[name] = [r["score"] for r in json.loads(res.stdout)]
    up, off = np.array(scores["upright"]), np.array(scores["turned"])
    assert np.median(up) > np.median(off) and np.mean(up > np.median(off)) >= 0.75, scores


def test_rotation_score_without_the_head_is_one_clear_error(digits_run, runner, tmp_path):
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a.png")
    res = runner.invoke(app, ["classify", str(digits_run / "model.safetensors"), str(tmp_path / "a.png"),
                              "--reject", "--reject-score", "rotation"])
    assert res.exit_code == 2, res.output
    assert "model.rotation" in res.stderr and "Traceback" not in res.output


def test_recipe_asking_rotation_score_without_the_head_fails_early(tmp_path, runner):
    res = runner.invoke(app, ["train", "recipes/tiny.yaml", "train.reject_score=rotation", "--out", str(tmp_path),
                              "--name", "x"])
    assert res.exit_code == 2, res.output
    assert "model.rotation" in res.stderr
    assert not (tmp_path / "x").exists()  # nothing half-made left behind
