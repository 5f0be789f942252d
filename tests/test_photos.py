"""Colour photos: the discretised logistic likelihood, the kornia strong view, the weights' moving average,
distribution alignment, and a colour folder of mixed sizes and modes trained, evaluated, sampled and
classified end to end (and resumed bit for bit after a kill, with all of it on)."""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.imagegen import photo_folder
from vae_cli.cli import app
from vae_cli.core.recipe import ModelConfig
from vae_cli.data.augment import crop_shift, strong
from vae_cli.models import build_model, losses

from .conftest import ROOT

# M2 on the residual backbone with the photo machinery on, small enough for seconds on 2 cores
PHOTO = ["data.name=folder", "data.image_size=16", "data.channels=3", "data.labels_per_class=8",
         "data.holdout_fraction=0.1", "model.name=m2", "model.backbone=resnet", "model.width=8", "model.decoder=mlp",
         "model.hidden=64", "model.latent_dim=8", "model.likelihood=logistic", "model.head_hidden=0",
         "model.alpha=3000", "model.consistency=3000", "model.threshold=0.8", "model.align=true",
         "model.unlabelled_elbo_images=16", "train.batch_size=32", "train.labelled_batch_size=16",
         "train.ema=0.9", "train.augment_shift=1", "train.augment_flip=true", "train.augment_crop=true",
         "train.kl_warmup_epochs=1",
         "train.head_steps=0", "train.reject_samples=4", "train.latent_map=pca", "train.num_samples=16"]

# recipes/folder-example.yaml's model (m2h: the same classifier, p(x|y,z) a hierarchical VAE's ladder), small:
# PHOTO without M2's decoder keys, with a ladder of latents at 4x4 and 8x8 (so it has levels for `ratio`)
M2_DECODER = ("model.name=", "model.decoder=", "model.hidden=", "model.latent_dim=", "model.likelihood=")
PHOTO_LADDER = [o for o in PHOTO if not o.startswith(M2_DECODER)] + [
    "model.likelihood=logistic_mixture", "model.mixtures=3", "model.decoder_width=8", "model.latent_channels=4",
    "model.depth=1", "model.latent_levels=2", "model.ladder_images=8"]

@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    photo_folder(root, 40, "train")
    test_files = photo_folder(root, 10, "test", seed=1)
    return root, test_files


@pytest.mark.parametrize("levels", [2, 17, 256])
def test_discretized_logistic_is_a_distribution(levels):
    """The masses of all `levels` values of one pixel sum to one, whatever the mean and scale."""
    grid = torch.linspace(0, 1, levels).view(levels, 1)
    for mean, log_scale in ((0.3, -2.0), (0.99, -5.0), (0.0, 0.5), (0.5, -7.0)):
        nll = losses.discretized_logistic_nll(torch.full_like(grid, mean), torch.tensor(log_scale), grid, levels)
        assert torch.isfinite(nll).all()
        assert torch.exp(-nll).sum().item() == pytest.approx(1.0, abs=1e-4)


def test_logistic_likelihood_scores_the_8bit_file():
    model = build_model(ModelConfig(likelihood="logistic", width=8, hidden=32, latent_dim=4), (3, 16, 16), 10)
    x = torch.randint(0, 256, (2, 3, 16, 16)) / 255.0
    nll = model.likelihood.nll(torch.zeros(2, 3, 16, 16), x)
    assert nll.shape == (2,) and (nll > 0).all()  # a probability (<= 1) of each 8-bit image


def test_colour_strong_view_is_per_image_and_seeded():
    x = torch.rand(1, 3, 16, 16).repeat(16, 1, 1, 1)  # sixteen copies of one image
    torch.manual_seed(3)
    a = strong(x, flip=True)
    torch.manual_seed(3)
    b = strong(x, flip=True)
    assert torch.equal(a, b)  # the run's RNG decides everything: resume sees the same views
    assert len({round(v, 5) for v in a.flatten(1).sum(1).tolist()}) > 8  # each copy augmented its own way
    assert a.min() >= 0 and a.max() <= 1


def test_crop_shift_moves_by_whole_pixels_with_mirrored_borders():
    x = torch.rand(1, 3, 12, 12).repeat(64, 1, 1, 1)
    torch.manual_seed(5)
    out = crop_shift(x, 2, flip=True)
    torch.manual_seed(5)
    assert torch.equal(out, crop_shift(x, 2, flip=True))  # seeded by the run's RNG
    padded = torch.nn.functional.pad(x[:1], (2, 2, 2, 2), mode="reflect")[0]
    windows = {(dy, dx, m) for dy in range(5) for dx in range(5) for m in (False, True)}
    seen = set()
    for img in out:  # each image is one window of the mirrored pad, maybe mirrored: no blur, no zero border
        match = [(dy, dx, m) for dy, dx, m in windows
                 if torch.equal(img, (lambda w: w.flip(2) if m else w)(padded[:, dy:dy + 12, dx:dx + 12]))]
        assert match, "not a whole-pixel shift of the input"
        seen.add(match[0])
    assert len(seen) > 10  # images draw their own shift and flip
    assert torch.equal(crop_shift(x, 0), x)


def test_recipe_refuses_crop_with_rotation_or_a_fractional_shift():
    from vae_cli.core.recipe import RecipeError, from_dict

    with pytest.raises(RecipeError, match="augment_rotate=0"):
        from_dict({"train": {"augment_crop": True, "augment_rotate": 10}})
    with pytest.raises(RecipeError, match="whole number .not 2.5."):
        from_dict({"train": {"augment_crop": True, "augment_shift": 2.5}})
    assert from_dict({"train": {"augment_shift": 2.5}}).train.augment_shift == 2.5  # sub-pixel shifts take it
    assert from_dict({"train": {"augment_crop": True, "augment_shift": 2}}).train.augment_crop


def test_alignment_divides_by_the_running_class_mean():
    model = build_model(ModelConfig(name="m2", align=True, width=8, hidden=32, latent_dim=4), (3, 16, 16), 4)
    skewed = torch.tensor([[0.7, 0.1, 0.1, 0.1]]).repeat(32, 1)
    model.train()
    for _ in range(400):
        out = model._pseudo_targets(skewed)
    assert model.q_mean[0] > 0.6  # it learned the model's bias towards class 0
    assert out[0, 0] < 0.5  # and takes it out of the pseudo-labels
    model.eval()
    before = model.q_mean.clone()
    model._pseudo_targets(skewed)
    assert torch.equal(model.q_mean, before)  # evaluation does not move it


def test_strong_subset_keeps_every_passing_image_and_tops_up():
    from vae_cli.models.m2 import strong_subset

    conf = torch.tensor([0.9, 0.1, 0.85, 0.3, 0.2, 0.95])
    mask = (conf >= 0.8).float()
    assert strong_subset(conf, mask, 2).tolist() == [0, 2, 5]  # all that passed, more than asked
    assert strong_subset(conf, mask, 4).tolist() == [0, 2, 3, 5]  # topped up with the next most confident
    assert strong_subset(conf, mask, 99).tolist() == list(range(6))
    assert strong_subset(conf, torch.zeros(6), 2).tolist() == [0, 5]


@pytest.mark.parametrize("share", [0.0, 0.5, 1.0])
def test_strong_view_on_passing_images_gives_the_full_batch_gradient(share):
    """Images below the threshold weigh zero in the consistency term, so running the strong view only on those
    that passed (model.strong_all=false) gives the gradient of running it on all (batch norm in eval mode, so its
    statistics do not depend on which images went through). `share`: the share of the 80 images that pass."""
    from vae_cli.models.base import Batch

    torch.manual_seed(1)
    x, x_lab = torch.rand(80, 3, 16, 16), torch.rand(8, 3, 16, 16)
    batch = Batch(x, torch.zeros(80, dtype=torch.long), torch.zeros(80, dtype=torch.bool), x_lab,
                  torch.arange(8) % 4, strong=lambda t: t.flip(-1) * 0.9)  # deterministic: no draws to differ
    grads, rates = [], []
    for strong_all in (True, False):
        cfg = ModelConfig(name="m2", width=8, hidden=32, latent_dim=4, backbone="resnet", decoder="mlp",
                          consistency=5.0, strong_all=strong_all, head_hidden=0)
        torch.manual_seed(0)
        model = build_model(cfg, (3, 16, 16), 4).eval()
        conf = model.predict_proba(x).max(1).values.sort().values.tolist()
        threshold = {0.0: 1.0, 1.0: 0.0}.get(share, (conf[39] + conf[40]) / 2)
        model.cfg = dataclasses.replace(cfg, threshold=threshold)
        torch.manual_seed(2)
        terms = model.loss(batch, 1.0)
        terms["loss"].backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
        rates.append(terms["pseudo_rate"].item())
    assert rates == [share, share]
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_labelled_images_of_the_batch_are_their_own_consistency_target():
    """With every image of the batch labelled and no prediction confident enough (threshold 1), the consistency
    term is the cross-entropy of the strong views against the true labels; with none labelled it is zero."""
    from vae_cli.models.base import Batch

    torch.manual_seed(0)
    cfg = ModelConfig(name="m2", width=8, hidden=32, latent_dim=4, backbone="resnet", decoder="mlp",
                      consistency=5.0, threshold=1.0, head_hidden=0)
    model = build_model(cfg, (3, 16, 16), 4).eval()
    x, y = torch.rand(70, 3, 16, 16), torch.arange(70) % 4

    def view(t):
        return t.flip(-1)

    for labelled in (True, False):
        batch = Batch(x, y, torch.full((70,), labelled), x[:8], y[:8], strong=view)
        got = model.loss(batch, 1.0)["consistency"].item()
        logits = model.class_logits(model.trunk(view(x)))
        want = torch.nn.functional.cross_entropy(logits, y).item() if labelled else 0.0
        assert got == pytest.approx(want, rel=1e-5, abs=1e-7)


def test_saved_weights_are_the_moving_average(tmp_path, photos, monkeypatch):
    from vae_cli.core import recipe as R
    from vae_cli.core.console import Reporter
    from vae_cli.engine import loop, train

    shadows = []

    class Spy(loop.EMA):
        def copy_to(self, model):
            shadows.append({k: v.clone() for k, v in self.shadow.items()})
            super().copy_to(model)

    monkeypatch.setattr(loop, "EMA", Spy)
    root, _ = photos
    r = R.load(None, [*PHOTO, f"data.root={root}", "epochs=2", "train.device=cpu", "train.precision=fp32"])
    res = train.train(r, out=tmp_path, name="ema", reporter=Reporter(quiet=True))
    saved = load_file(res.paths["weights"])
    assert shadows, "the moving average was never put into the model"
    avg = shadows[-1]
    assert all(torch.equal(saved[k], avg[k]) for k in avg if k in saved)


def test_colour_folder_end_to_end(tmp_path, photos, runner):
    """train, eval, sample and classify a colour folder of 64-128 px JPEG/PNG files in RGB, palette, RGBA and
    CMYK at 16x16: the model beats chance (1/3) clearly and every command works on it."""
    root, test_files = photos
    res = runner.invoke(app, ["train", "recipes/folder-example.yaml", *PHOTO_LADDER, f"data.root={root}", "epochs=12",
                              "--out", str(tmp_path), "--name", "photo", "--device", "cpu", "--precision", "fp32",
                              "--json", "--quiet"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["test"]["accuracy"] > 0.8, out["test"]["accuracy"]
    weights = tmp_path / "photo" / "model.safetensors"
    ev = runner.invoke(app, ["eval", str(weights), "--json", "--iw-samples", "4"])
    assert ev.exit_code == 0, ev.output
    report = json.loads(ev.stdout)
    nll = report["nll"]
    assert nll["discrete"] is True and nll["levels"] == 256 and 0 < nll["bits_per_dim"] < 16
    # the shipped template classifies and generates (m2h: the ladder as p(x|y,z)); both picture numbers measured
    from vae_cli.artifacts.checkpoint import read_metadata

    assert read_metadata(weights)["recipe"]["model"]["name"] == "m2h"
    assert 0 <= report["recon_accuracy"] <= 1 and 0 <= report["sample_accuracy"] <= 1
    cl = runner.invoke(app, ["classify", str(weights), *map(str, test_files), "-f", "json"])
    assert cl.exit_code == 0, cl.output
    rows = json.loads(cl.stdout)
    right = sum(r["top"][0]["class"] == r["path"].split("/")[-2] for r in rows)
    assert len(rows) == len(test_files) and right / len(rows) > 0.8
    sa = runner.invoke(app, ["sample", str(weights), "-n", "9", "-o", str(tmp_path / "s.png"), "--class", "disc"])
    assert sa.exit_code == 0 and (tmp_path / "s.png").stat().st_size > 0


def _train_cmd(out, name, root, *extra):
    return [sys.executable, "-m", "vae_cli", "train", "recipes/tiny.yaml", *PHOTO, f"data.root={root}", "epochs=3",
            "train.checkpoint_every=3", "--out", str(out), "--name", name, "--device", "cpu", "--precision", "fp32",
            *extra]


def test_killed_photo_run_resumes_bit_identical(tmp_path, photos):
    """SIGKILL during epoch 2 with the kornia strong view, EMA and alignment on; --resume ends with the same
    weights as a run that was never interrupted."""
    root, _ = photos
    ref = subprocess.run(_train_cmd(tmp_path, "ref", root, "--quiet"), cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert ref.returncode == 0, ref.stderr
    proc = subprocess.Popen(_train_cmd(tmp_path, "cut", root), cwd=ROOT, stderr=subprocess.PIPE, text=True,
                            stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if "epoch 1/" in line or (not line and proc.poll() is not None):
            break
    time.sleep(0.5)  # into epoch 2 (a mid-epoch state every 3 steps)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    again = subprocess.run(_train_cmd(tmp_path, "cut", root, "--resume", "--quiet"), cwd=ROOT, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    a = load_file(str(tmp_path / "ref" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
