"""`vae train --init WEIGHTS` (issue 31, engine/warmstart.py): tensors matched by name and shape, class rows
by class name (grown, shrunk, reordered class lists), refusals naming the key, the warm schedule, and a warm
start killed with -9 and resumed ending bit-identical to one never interrupted."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.test_photos import PHOTO, photos  # noqa: F401  (the fixture)
from vae_cli.api import load
from vae_cli.artifacts import checkpoint
from vae_cli.cli import app
from vae_cli.core.errors import RecipeError, VaeError
from vae_cli.engine.warmstart import class_axes, warm_start
from vae_cli.models import REGISTRY, build_model

from .conftest import ROOT, TINY

SMALL = ["--device", "cpu", "--precision", "fp32", "--quiet", "--json"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, photos, runner):  # noqa: F811
    root, _ = photos
    out = tmp_path_factory.mktemp("init")
    res = runner.invoke(app, ["train", "recipes/tiny.yaml", *PHOTO, f"data.root={root}", "epochs=2", "--out",
                              str(out), "--name", "old", *SMALL])
    assert res.exit_code == 0, res.output
    return out / "old" / "model.safetensors"


def _fresh(weights, classes):
    """A new model of the same recipe for `classes` (built from the weights file's recipe)."""
    _, meta = checkpoint.load(weights)
    r = meta["recipe_obj"]
    build = lambda k: build_model(r.model, tuple(meta["image_shape"]), k)  # noqa: E731
    torch.manual_seed(1)
    return build(len(classes)), build


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_class_axes_are_found_for_every_model(name):
    from vae_cli.core.recipe import ModelConfig

    cfg = ModelConfig(name=name, latent_dim=4, hidden=16, head_hidden=8)
    build = lambda k: build_model(cfg, (3, 16, 16), k)  # noqa: E731
    axes = class_axes(build, 4, list(build(4).state_dict()))
    assert axes and all(a is not None for a in axes.values()), axes  # every class-shaped tensor can be mapped


def test_reordered_classes_give_every_image_the_same_class_name(trained, photos):  # noqa: F811
    _, test_files = photos
    old = load(trained, "cpu", "fp32")
    before = {r["path"]: r["top"][0]["class"] for r in old.classify(test_files)[0]}
    probs_before = old.predict_proba(old.load_images(test_files))
    order = ["disc", "band", "bar"]  # the folder's order is band, bar, disc
    assert old.classes != order
    model, build = _fresh(trained, order)
    report = warm_start(model, trained, order, build)
    assert report.share == 1.0 and report.new == 0 and report.classes_kept == order
    model.eval()
    with torch.no_grad():
        probs = torch.softmax(model.predict_logits(old.load_images(test_files)), 1)
    for j, c in enumerate(order):  # the same probability for each class name
        assert torch.allclose(probs[:, j], probs_before[:, old.classes.index(c)], atol=1e-5)
    after = {p: order[i] for p, i in zip(map(str, test_files), probs.argmax(1).tolist())}
    assert after == before


def test_a_grown_class_list_keeps_the_old_rows_and_adds_one(trained):
    classes = ["band", "bar", "disc", "ring"]
    model, build = _fresh(trained, classes)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    report = warm_start(model, trained, classes, build)
    assert report.classes_added == ["ring"] and report.classes_removed == [] and report.share > 0.9
    old = load_file(str(trained))
    axes = class_axes(build, 4, list(fresh))
    for name, axis in axes.items():
        new_t, old_t = model.state_dict()[name], old[name]
        k_new, k_old = new_t.shape[axis], old_t.shape[axis]
        assert torch.equal(new_t.narrow(axis, k_new - 4, 3), old_t.narrow(axis, k_old - 3, 3))  # old classes
        assert torch.equal(new_t.narrow(axis, k_new - 1, 1), fresh[name].narrow(axis, k_new - 1, 1))  # new row


def test_a_shrunk_class_list_drops_the_removed_row(trained):
    classes = ["disc", "band"]
    model, build = _fresh(trained, classes)
    report = warm_start(model, trained, classes, build)
    assert report.classes_removed == ["bar"] and report.classes_kept == ["disc", "band"]


def test_another_architecture_or_a_training_state_is_refused_naming_the_key(trained, tmp_path):
    from vae_cli.core.recipe import ModelConfig

    other = build_model(ModelConfig(name="vae", latent_dim=4, hidden=16), (1, 28, 28), 3)
    with pytest.raises(RecipeError, match=r"train.init: .* provides only"):
        warm_start(other, trained, ["band", "bar", "disc"],
                   lambda k: build_model(ModelConfig(name="vae", latent_dim=4, hidden=16), (1, 28, 28), k))
    state = trained.parent / "last.safetensors"
    model, build = _fresh(trained, ["band", "bar", "disc"])
    with pytest.raises(RecipeError, match="--resume continues"):
        warm_start(model, state, ["band", "bar", "disc"], build)
    (tmp_path / "junk.safetensors").write_bytes(b"nope")
    with pytest.raises(VaeError, match="train.init"):
        warm_start(model, tmp_path / "junk.safetensors", ["band", "bar", "disc"], build)


def test_init_from_the_cli_reports_and_repeats_from_the_saved_recipe(trained, photos, tmp_path, runner):  # noqa: F811
    root, _ = photos
    grown = tmp_path / "grown"
    shutil.copytree(root, grown)
    for split in ("train", "test"):
        shutil.copytree(grown / split / "disc", grown / split / "ring")
    res = runner.invoke(app, ["train", "recipes/tiny.yaml", *PHOTO, f"data.root={grown}", "epochs=1", "--init",
                              str(trained), "--out", str(tmp_path), "--name", "new", *SMALL])
    assert res.exit_code == 0, res.output
    init = json.loads(res.stdout)["init"]
    assert init["classes_added"] == ["ring"] and init["loaded"] > 0 and init["warm"] is True
    saved = yaml.safe_load((tmp_path / "new" / "recipe.yaml").read_text())
    assert saved["train"]["init"] == str(trained)
    rows = (tmp_path / "new" / "metrics.csv").read_text().splitlines()
    assert rows[1].split(",")[rows[0].split(",").index("kl_weight")] == "1.0"  # no KL warm-up on a warm start


def test_warm_start_killed_and_resumed_is_bit_identical(trained, photos, tmp_path):  # noqa: F811
    root, _ = photos

    def cmd(name, *extra):
        return [sys.executable, "-m", "vae_cli", "train", str(TINY), *PHOTO, f"data.root={root}", "epochs=3",
                "train.checkpoint_every=3", "--init", str(trained), "--out", str(tmp_path), "--name", name,
                "--device", "cpu", "--precision", "fp32", *extra]

    ref = subprocess.run(cmd("ref", "--quiet"), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr
    proc = subprocess.Popen(cmd("cut"), cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if "epoch 1/" in line or (not line and proc.poll() is not None):
            break
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    again = subprocess.run(cmd("cut", "--resume", "--quiet"), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    a = load_file(str(tmp_path / "ref" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_an_unsupervised_ladder_starts_a_few_label_m2h(photos, tmp_path, runner):  # noqa: F811
    """Transfer (issue 31): the hierarchical VAE's tensors are found inside m2h's `gen.` ladder by name."""
    root, _ = photos
    data = ["data.name=folder", f"data.root={root}", "data.image_size=16", "data.channels=3",
            "data.labels_per_class=8", "model.latent_dim=16", "model.hidden=256", "model.head_hidden=0",
            "model.width=8", "train.latent_map=pca", "train.num_samples=16", "train.head_steps=0"]
    res = runner.invoke(app, ["train", "recipes/tiny.yaml", *data, "model.name=hvae", "epochs=1", "--out",
                              str(tmp_path), "--name", "ladder", *SMALL])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["train", "recipes/tiny.yaml", *data, "model.name=m2h", "epochs=1", "--init",
                              str(tmp_path / "ladder" / "model.safetensors"), "--out", str(tmp_path), "--name", "m2h",
                              *SMALL])
    assert res.exit_code == 0, res.output
    init = json.loads(res.stdout)["init"]
    assert init["tensor_share"] >= 0.85 and init["warm"] is True


def test_promote_scores_both_models_on_the_new_images_by_class_name(trained, photos, tmp_path, runner):  # noqa: F811
    """A class folder appears; the nightly job warm-starts from the production model and promotes over it: both
    are scored on the new test split, the old model's answers read by class name (a 'ring' is a miss for it)."""
    root, _ = photos
    grown = tmp_path / "grown"
    shutil.copytree(root, grown)
    for split in ("train", "test"):
        shutil.copytree(grown / split / "disc", grown / split / "ring")
    prod = tmp_path / "prod.safetensors"
    shutil.copyfile(trained, prod)
    res = runner.invoke(app, ["train", "recipes/tiny.yaml", *PHOTO, f"data.root={grown}", "epochs=1", "--init",
                              str(trained), "--promote", str(prod), "--out", str(tmp_path), "--name", "new", *SMALL])
    assert res.exit_code in (0, 3), res.output
    decision = json.loads(res.stdout)["promotion"]
    test_files = sorted(p for p in (grown / "test").rglob("*") if p.is_file())
    assert decision["images"] == len(test_files) and decision["unknown_to_old"] == ["ring"]

    def accuracy(weights):  # another path to the same number: the API's answers against the folder names
        rows = load(weights, "cpu", "fp32").classify(test_files)[0]
        return sum(r["top"][0]["class"] == p.parent.name for r, p in zip(rows, test_files)) / len(test_files)

    assert decision["old"] == pytest.approx(accuracy(trained), abs=1e-9)
    assert decision["old"] <= 1 - 10 / len(test_files) + 1e-9  # the ten rings are misses for the old model
    assert decision["new"] == pytest.approx(accuracy(tmp_path / "new" / "model.safetensors"), abs=1e-9)
    assert decision["promoted"] == (decision["new"] > decision["old"])
    assert (prod.read_bytes() == (tmp_path / "new" / "model.safetensors").read_bytes()) == decision["promoted"]
