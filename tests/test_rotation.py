"""The self-supervised tasks of M2, rotation (`model.rotation`) and colour order (`model.colour_order`), and
their `--reject` scores: the turns and channel orders are the ones claimed and repeat from the seed, the heads
learn and travel in the weights file, and the scores rank upright photos above the same photos turned a
quarter, and photos in their own colours above the same photos with their channels swapped."""

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
from vae_cli.models.m2 import CHANNEL_ORDERS, random_channel_orders, random_turns, reorder_channels

from .test_photos import PHOTO_LADDER


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


def test_channel_orders_are_the_ones_reported_seeded_and_keep_the_layout():
    x = torch.rand(60, 3, 6, 5).contiguous(memory_format=torch.channels_last)
    torch.manual_seed(5)
    out, orders = random_channel_orders(x)
    torch.manual_seed(5)
    again, orders2 = random_channel_orders(x)
    assert torch.equal(out, again) and torch.equal(orders, orders2)
    assert set(orders.tolist()) == set(range(6)) and CHANNEL_ORDERS[0] == (0, 1, 2)
    for i, k in enumerate(orders.tolist()):  # channel c of the output is channel CHANNEL_ORDERS[k][c] of the input
        for c, src in enumerate(CHANNEL_ORDERS[k]):
            assert torch.equal(out[i, c], x[i, src])
    assert out.is_contiguous(memory_format=torch.channels_last)  # the trunk's layout, as the batch came
    assert torch.equal(reorder_channels(x, torch.zeros(60, dtype=torch.long)), x)


CFG = dict(name="m2", backbone="resnet", decoder="mlp", width=8, hidden=32, latent_dim=4, head_hidden=0,
           likelihood="logistic", unlabelled_elbo_images=4)


def test_colour_term_trains_its_head_is_off_by_default_and_needs_colour():
    x, y = torch.rand(8, 3, 16, 16), torch.randint(0, 3, (8,))
    batch = Batch(x, y, torch.zeros(8, dtype=torch.bool), x[:4], y[:4])
    plain = build_model(ModelConfig(rotation=1.0, **CFG), (3, 16, 16), 3)
    assert "colour_order" not in plain.loss(batch, 1.0) and plain.colour_logp(x) is None
    grey = build_model(ModelConfig(colour_order=1.0, **CFG), (1, 16, 16), 3)
    assert not grey.has_colour_head  # a grey image has one order of its one channel
    torch.manual_seed(0)
    model = build_model(ModelConfig(colour_order=100.0, rotation=100.0, **CFG), (3, 16, 16), 3)
    terms = model.loss(batch, 1.0)
    assert torch.isfinite(terms["colour_order"]) and torch.isfinite(terms["rotation"])  # one pass, both tasks
    terms["loss"].backward()
    assert model.colour_head.weight.grad.abs().sum() > 0 and model.rotation_head.weight.grad.abs().sum() > 0
    # trained on the colour task alone for a few steps, the head tells swapped colours from true ones
    pics = torch.empty(32, 3, 16, 16)
    pics[:] = torch.tensor([0.3, 0.5, 0.9]).view(1, 3, 1, 1) * torch.rand(32, 1, 1, 1)  # skies: more blue than red
    pics[:, :, 8:] = torch.tensor([0.3, 0.7, 0.2]).view(1, 3, 1, 1) * torch.rand(32, 1, 1, 1)  # grass: green
    _train_head_alone(model, model.colour_head, random_channel_orders, pics)
    with torch.no_grad():
        swapped = pics[:, [2, 1, 0]]  # red and blue swapped: orange skies
        assert (model.colour_logp(pics) > model.colour_logp(swapped)).float().mean() > 0.9


def test_with_both_heads_half_the_images_are_turned_and_half_recoloured():
    model = build_model(ModelConfig(colour_order=1.0, rotation=1.0, **CFG), (3, 16, 16), 3).eval()
    x = torch.rand(10, 3, 16, 16)
    torch.manual_seed(7)
    got = model._transform_tasks(x, torch.tensor(0.0))
    torch.manual_seed(7)  # the same draws, by hand: turns for the first 5, channel orders for the last 5
    xr, turns = random_turns(x[:5])
    xc, orders = random_channel_orders(x[5:])
    with torch.no_grad():
        h = model.trunk(torch.cat([xr, xc]))
        want_rot = torch.nn.functional.cross_entropy(model.rotation_head(h[:5]), turns)
        want_col = torch.nn.functional.cross_entropy(model.colour_head(h[5:]), orders)
    assert torch.allclose(got["rotation"], want_rot) and torch.allclose(got["colour_order"], want_col)
    assert torch.allclose(got["loss"], want_rot + want_col)


def _train_head_alone(model, head, transform, pics, steps: int = 60) -> None:
    """A few steps of one self-supervised task alone (`transform` gives the images and their targets); leaves
    the model in eval mode."""
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(steps):
        xt, target = transform(pics)
        loss = torch.nn.functional.cross_entropy(head(model.trunk(xt)), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def test_rotation_term_trains_its_head_and_is_off_by_default():
    x, y = torch.rand(8, 3, 16, 16), torch.randint(0, 3, (8,))
    batch = Batch(x, y, torch.zeros(8, dtype=torch.bool), x[:4], y[:4])
    plain = build_model(ModelConfig(**CFG), (3, 16, 16), 3)
    assert "rotation" not in plain.loss(batch, 1.0) and plain.upright_logp(x) is None
    torch.manual_seed(0)
    model = build_model(ModelConfig(rotation=100.0, **CFG), (3, 16, 16), 3)
    terms = model.loss(batch, 1.0)
    assert torch.isfinite(terms["rotation"])
    terms["loss"].backward()
    assert model.rotation_head.weight.grad.abs().sum() > 0
    # trained on the rotation task alone for a few steps, the head tells turned images from upright ones
    pics = torch.zeros(32, 3, 16, 16)
    pics[:, :, :6] = torch.rand(32, 3, 1, 1)  # a coloured top band over a dark ground, each its own colour
    _train_head_alone(model, model.rotation_head, random_turns, pics)
    with torch.no_grad():
        assert (model.upright_logp(pics) > model.upright_logp(pics.flip(2))).float().mean() > 0.9


@pytest.fixture(scope="module")
def rotation_run(tmp_path_factory, runner):
    """A small colour-photo M2 trained with the rotation and colour-order tasks; the test photos with an
    orientation (bars stand upright, bands run one diagonal way; a disc has none) and their copies turned a
    quarter; every test photo, and a copy of each with its red and blue channels swapped."""
    root = tmp_path_factory.mktemp("rotphotos")
    photo_folder(root, 40, "train")
    test_files = photo_folder(root, 10, "test", seed=1)
    oriented = [f for f in test_files if f.parent.name != "disc"]
    turned = root / "turned"
    turned.mkdir()
    for i, f in enumerate(oriented):
        Image.open(f).convert("RGB").transpose(Image.Transpose.ROTATE_90).save(turned / f"{i:03d}.png")
    swapped = root / "swapped"
    swapped.mkdir()
    for i, f in enumerate(test_files):
        Image.fromarray(np.asarray(Image.open(f).convert("RGB"))[..., ::-1].copy()).save(swapped / f"{i:03d}.png")
    out = tmp_path_factory.mktemp("rotrun")
    res = runner.invoke(app, ["train", "recipes/folder-example.yaml", *PHOTO_LADDER, f"data.root={root}", "epochs=10",
                              "model.rotation=3000", "model.colour_order=3000", "--out", str(out), "--name", "rot",
                              "--device", "cpu", "--precision", "fp32", "--json", "--quiet"])
    assert res.exit_code == 0, res.output
    return out / "rot" / "model.safetensors", oriented, turned, test_files, swapped


def test_rotation_score_is_calibrated_and_joins_the_default(rotation_run):
    from vae_cli.artifacts.checkpoint import read_metadata

    cal = read_metadata(rotation_run[0])["reject"]
    # rotation's held-out values travel with the others, the ladder's ratio too (folder-example is m2h)
    assert set(cal["components"]) == set(reject.BASE)
    assert set(cal["test_reject_rates"]) == set(reject.SCORES.names())
    held = reject.held_sorted(cal)
    base = {n: torch.tensor(v, dtype=torch.float64) for n, v in cal["components"].items()}
    both = reject.values("combined", base, held, in_sample=True)
    for head in ("rotation", "colour"):  # each head's p-value is part of the default score
        without = reject.values("combined", base, {n: v for n, v in held.items() if n != head}, in_sample=True)
        assert not torch.allclose(both, without), head


def _ranks_above(runner, weights, score: str, good: list, bad: list) -> None:
    scores = {}
    for name, paths in (("good", good), ("bad", bad)):
        res = runner.invoke(app, ["classify", str(weights), *map(str, paths), "-f", "json", "--reject-score", score])
        assert res.exit_code == 0, res.output
        scores[name] = [r["score"] for r in json.loads(res.stdout)]
    good_s, bad_s = np.array(scores["good"]), np.array(scores["bad"])
    assert np.median(good_s) > np.median(bad_s) and np.mean(good_s > np.median(bad_s)) >= 0.75, scores


def test_rotation_score_ranks_upright_above_turned(rotation_run, runner):
    weights, oriented, turned, _, _ = rotation_run
    _ranks_above(runner, weights, "rotation", oriented, [turned])


def test_colour_score_ranks_true_colours_above_swapped(rotation_run, runner):
    weights, _, _, test_files, swapped = rotation_run
    _ranks_above(runner, weights, "colour", test_files, [swapped])


@pytest.mark.parametrize("score,key", [("rotation", "model.rotation"), ("colour", "model.colour_order")])
def test_a_head_score_without_the_head_is_one_clear_error(digits_run, runner, tmp_path, score, key):
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a.png")
    res = runner.invoke(app, ["classify", str(digits_run / "model.safetensors"), str(tmp_path / "a.png"),
                              "--reject", "--reject-score", score])
    assert res.exit_code == 2, res.output
    assert key in res.stderr and "Traceback" not in res.output


@pytest.mark.parametrize("score,key", [("rotation", "model.rotation"), ("colour", "model.colour_order")])
def test_recipe_asking_a_head_score_without_the_head_fails_early(tmp_path, runner, score, key):
    res = runner.invoke(app, ["train", "recipes/tiny.yaml", f"train.reject_score={score}", "--out", str(tmp_path),
                              "--name", "x"])
    assert res.exit_code == 2, res.output
    assert key in res.stderr
    assert not (tmp_path / "x").exists()  # nothing half-made left behind
