"""The `--reject` scores (likelihood, complexity, confidence, combined), their calibration in the weights
file, `classify --reject-score` and `vae eval --ood`, on real PNG files and a trained digits model."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import ROOT
from tests.imagegen import noise, outliers
from vae_cli.artifacts.checkpoint import read_metadata
from vae_cli.cli import app
from vae_cli.core.errors import CheckpointError
from vae_cli.evaluation import metrics, pvalues, reject


def test_tail_p_by_hand():
    from scipy.stats import norm

    ref = [1.0, 2.0, 3.0]  # mean 2, sd 1
    p = lambda v, side="lower", **kw: pvalues.tail_logp(torch.tensor(v), ref, side, **kw).exp().tolist()  # noqa: E731
    assert p([1.0, 2.0, 2.5, 3.0]) == pytest.approx([2 / 4, 3 / 4, 3 / 4, 4 / 4])
    assert p([1.0, 2.0, 3.0], "upper") == pytest.approx([4 / 4, 3 / 4, 2 / 4])
    assert p([1.0, 2.0, 3.0], "two") == pytest.approx([1.0, 1.0, 1.0])
    # a held-out image is already counted once: the lowest gets 1/(n+1), like a new image just below them
    assert p(ref, in_sample=True) == pytest.approx([1 / 4, 2 / 4, 3 / 4])
    assert p(ref, "upper", in_sample=True) == pytest.approx([3 / 4, 2 / 4, 1 / 4])
    # beyond the held-out range: 1/(n+1) times a normal tail ratio, so farther out is always less likely
    assert p([0.0]) == pytest.approx([0.25 * norm.cdf(-2) / norm.cdf(-1)])
    assert p([5.0], "upper") == pytest.approx([0.25 * norm.sf(3) / norm.sf(1)])
    assert p([0.0], "two") == pytest.approx([2 * 0.25 * norm.cdf(-2) / norm.cdf(-1)])
    far = pvalues.tail_logp(torch.tensor([-1e6]), ref)
    assert torch.isfinite(far).all() and far.item() < -1e10  # no underflow to log(0)


def test_detection_numbers_by_hand():
    # outliers are the positive class and should score LOW. Pairs (outlier below in-distribution):
    # 1 < 3,4,5 (3); 3.5 < 4,5 (2); 6 < none -> AUROC 5/9. Ranked most outlying first: 1+ 3- 3.5+ 4- 5- 6+,
    # so the precisions at each outlier are 1/1, 2/3, 3/6 -> AUPR (average precision) 13/18.
    d = metrics.detection(torch.tensor([3.0, 4.0, 5.0]), torch.tensor([1.0, 3.5, 6.0]), threshold=4.0)
    assert d["auroc"] == pytest.approx(5 / 9) and d["aupr"] == pytest.approx(13 / 18)
    assert d["false_reject_rate"] == pytest.approx(1 / 3) and d["reject_rate"] == pytest.approx(2 / 3)
    assert (d["in_images"], d["out_images"]) == (3, 3)
    perfect = metrics.detection(torch.tensor([5.0, 6.0]), torch.tensor([1.0, 2.0]), threshold=3.0)
    assert perfect["auroc"] == 1.0 and perfect["aupr"] == 1.0 and perfect["reject_rate"] == 1.0


def test_png_bits_is_deterministic_and_tracks_complexity():
    rng = np.random.RandomState(0)
    flat = torch.full((1, 3, 32, 32), 0.5)
    ramp = torch.linspace(0, 1, 32).view(1, 1, 1, 32).expand(1, 3, 32, 32).contiguous()
    rough = torch.from_numpy(rng.randint(0, 256, (1, 3, 32, 32)).astype(np.float32) / 255)
    bits = pvalues.png_bits(torch.cat([flat, ramp, rough]))
    assert bits.tolist() == pvalues.png_bits(torch.cat([flat, ramp, rough])).tolist()
    assert bits[0] < bits[1] < bits[2]
    assert bits[2] > 8 * 3 * 32 * 32 * 0.9  # uniform noise barely compresses: close to 8 bits per value
    grey = pvalues.png_bits(torch.rand(2, 1, 8, 8))
    assert grey.shape == (2,) and (grey > 0).all()


def test_confidence_does_not_saturate():
    probs = torch.tensor([[1 - 1e-9, 1e-9, 0.0], [0.5, 0.3, 0.2], [1.0, 0.0, 0.0]])
    c = pvalues.confidence_logit(probs)
    assert c[0] > c[1] and math.isfinite(c[2].item()) and c[2] > c[0]
    assert c[1].item() == pytest.approx(0.0, abs=1e-6)  # p_max = 0.5: even odds


# the scores a model without the self-supervised heads has (tests/test_rotation.py covers those)
DIGIT_SCORES = [n for n in reject.SCORES.names() if n not in ("rotation", "colour", "ratio")]  # no heads, no hierarchy


@pytest.fixture(scope="module")
def sets(tmp_path_factory, digits_run):
    """80 held-back test digits and 10+ each of noise, letters and shapes, as PNG files, 4x enlarged."""
    from vae_cli.core.recipe import load
    from vae_cli.data import build_dataset

    root = tmp_path_factory.mktemp("ood")
    data = build_dataset(load(digits_run / "recipe.yaml").data, 0)
    (root / "digits").mkdir()
    for i in range(80):
        img = (data.test_x[i, 0].numpy() * 255).round().astype(np.uint8).repeat(4, 0).repeat(4, 1)
        Image.fromarray(img).save(root / "digits" / f"{i:03d}.png")
    outliers(root, (32, 32), count=20)
    return root


def test_calibration_holds_every_score_per_image(digits_run):
    cal = read_metadata(digits_run / "model.safetensors")["reject"]
    assert cal["score"] == "combined"  # the recipe default
    assert set(cal["components"]) == set(reject.BASE) - {"rotation", "colour", "ratio"}  # a plain VAE: no heads
    assert cal["knn_k"] == 1  # 143 held-out images: k = n / 100, at least 1
    assert all(len(v) == cal["holdout_images"] for v in cal["components"].values())
    assert set(cal["test_reject_rates"]) == set(DIGIT_SCORES)
    # the stored threshold is the rate quantile of the default score, rebuilt from the components
    rebuilt = reject.held_out_values(cal, "combined")
    assert cal["threshold"] == pytest.approx(float(torch.quantile(rebuilt, cal["rate"])))
    assert cal["holdout_scores"] == pytest.approx(sorted(rebuilt.tolist()))
    for name in DIGIT_SCORES:  # each score's threshold lets about `rate` of the held-out images fall
        below = (reject.held_out_values(cal, name) < reject.threshold_of(cal, name, 0.1)).double().mean()
        assert 0.05 <= below <= 0.12, name


def test_fisher_counts_a_group_of_dependent_scores_once():
    """A group's p-values become one by Bonferroni (k x the smallest, capped at 1) before Fisher's sum."""
    held = {n: [float(v) for v in range(99)] for n in "abc"}
    base = {"a": torch.tensor([10.0, 50.0, -5.0]), "b": torch.tensor([90.0, 49.0, 50.0]),
            "c": torch.tensor([3.0, 60.0, 120.0])}
    la, lb, lc = (pvalues.tail_logp(base[n], held[n], side) for n, side in (("a", "two"), ("b", "two"), ("c", "lower")))
    got = pvalues.fisher(((("a", "two"), ("b", "two")), ("c", "lower")))(base, held)
    want = 2 * ((math.log(2) + torch.minimum(la, lb)).clamp_max(0) + lc)
    assert torch.allclose(got, want)
    assert got[1] > got[0] and got[1] > got[2]  # typical in every view beats extreme in one
    plain = pvalues.fisher((("a", "two"), ("b", "two"), ("c", "lower")))(base, held)
    assert torch.allclose(plain, 2 * (la + lb + lc))


def test_files_calibrated_before_energy_keep_their_combination(digits_run):
    """A weights file whose calibration has no energy values (older versions) combines confidence as before,
    so its stored threshold still holds; asking it for the energy score is a clear error."""
    cal = read_metadata(digits_run / "model.safetensors")["reject"]
    old = {**cal, "components": {n: v for n, v in cal["components"].items() if n not in ("energy", "knn")}}
    held = reject.held_sorted(old)
    base = {n: torch.tensor(v, dtype=torch.float64) for n, v in old["components"].items()}
    before = pvalues.fisher(((("likelihood", "two"), ("complexity", "two")), ("confidence", "lower")))
    assert torch.allclose(reject.held_out_values(old, "combined"), before(base, held, True))
    new = reject.held_out_values(cal, "combined")
    assert not torch.allclose(new, reject.held_out_values(old, "combined"))  # energy is in the new files' one
    with pytest.raises(CheckpointError, match="before the energy score existed"):
        reject.held_out_values(old, "energy")


def test_files_calibrated_before_knn_keep_their_combination(digits_run):
    """Session 7's files (energy, no knn values or features) combine without knn; `knn` on them is a clear
    error, and so is a knn calibration whose features tensor is missing."""
    meta = read_metadata(digits_run / "model.safetensors")
    cal = meta["reject"]
    old = {**cal, "components": {n: v for n, v in cal["components"].items() if n != "knn"}}
    held = reject.held_sorted(old)
    base = {n: torch.tensor(v, dtype=torch.float64) for n, v in old["components"].items()}
    before = pvalues.fisher(((("likelihood", "two"), ("complexity", "two")), ("energy", "lower")))
    assert torch.allclose(reject.held_out_values(old, "combined"), before(base, held, True))
    assert not torch.allclose(reject.held_out_values(cal, "combined"), reject.held_out_values(old, "combined"))
    with pytest.raises(CheckpointError, match="before the knn score existed"):
        reject.held_out_values(old, "knn")
    assert reject.gate({**meta, "reject": old}).reference is None
    with pytest.raises(CheckpointError, match="lacks the held-out features"):
        reject.gate(meta)  # read_metadata does not load tensors: the features are missing


def test_knn_needs_two_held_out_images_and_says_so_before_training():
    """k is n/100 (1 to 20) and needs one held-out image more than k; a recipe whose default is knn on a split
    too small for it is refused before training with the key to change, not after it as a damaged file."""
    from vae_cli.core.recipe import ModelConfig
    from vae_cli.models import build_model

    assert [reject.knn_k(n) for n in (1, 2, 150, 999, 2500, 10**6)] == [None, 1, 1, 9, 20, 20]
    model = build_model(ModelConfig(name="vae", width=8, hidden=16, latent_dim=2), (1, 8, 8), 3)
    why = reject.unavailable("knn", model, 1)
    assert why is not None and "data.holdout_fraction" in why and "\n" not in why
    assert reject.unavailable("knn", model, 2) is None and reject.unavailable("combined", model, 1) is None
    assert "model.rotation" in reject.unavailable("rotation", model, 100)
    with pytest.raises(CheckpointError, match="fewer than 2 held-out images"):
        reject.held_out_values({"components": {n: [0.0] for n in ("likelihood", "complexity", "confidence",
                                                                  "energy")}}, "knn")


def test_knn_is_the_kth_nearest_held_out_similarity():
    """By hand on unit vectors: the k-th largest cosine similarity, the image's own match left out in-sample."""
    ref = reject.Reference(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]), k=2)
    got = reject.knn_similarity(torch.tensor([[2.0, 0.0], [0.0, -1.0]]), ref)
    assert got.tolist() == pytest.approx([0.6, -0.8])  # (1, 0): sims 1, 0, 0.6 -> 0.6; (0, -1): 0, -1, -0.8 -> -0.8
    loo = reject.knn_similarity(ref.features, ref, leave_self_out=True)
    assert loo.tolist() == pytest.approx([0.0, 0.0, 0.6])  # each skips itself (similarity 1), then the 2nd


def test_the_gate_measures_only_what_the_files_combination_reads(digits_run, monkeypatch):
    """`classify --reject` with the combined score runs the classifier for energy only (confidence only in files
    calibrated before energy), and for rotation only where the model has the head: each is a trunk pass or two
    per image. What it leaves out does not change the scores."""
    from vae_cli.artifacts import checkpoint
    from vae_cli.core.runtime import resolve

    cal = read_metadata(digits_run / "model.safetensors")["reject"]
    held = reject.held_sorted(cal)
    assert reject.needs("combined", held) == {"log_px", "png_bits", "energy", "knn"}  # a plain VAE: no rotation head
    old = reject.held_sorted({**cal, "components": {n: v for n, v in cal["components"].items()
                                                    if n not in ("energy", "knn")}})
    assert reject.needs("combined", old) == {"log_px", "png_bits", "confidence"}
    assert reject.needs("combined", {**held, "rotation": [0.0]}) == {"log_px", "png_bits", "energy", "knn", "upright"}
    assert reject.needs("combined") == set(reject.SCORES.get("combined").parts)  # no file: everything
    assert reject.needs("energy", held) == {"energy"}

    model, meta = checkpoint.load(digits_run / "model.safetensors")
    rt = resolve("cpu", "fp32")
    x = torch.rand(6, *model.image_shape)
    asked = []
    measure = reject.measure
    monkeypatch.setattr(reject, "measure", lambda *a, **k: asked.append(set(a[5])) or measure(*a, **k))
    g = reject.gate(meta)
    got = g.scores(model, x, rt, seed=3)
    assert asked == [{"log_px", "png_bits", "energy", "knn"}]
    full = reject.values("combined", reject.base_values(measure(model, x, rt, g.samples, 3, reference=g.reference)),
                         g.held)
    assert torch.allclose(got, full)


def _classify(runner, weights, paths, *extra):
    res = runner.invoke(app, ["classify", str(weights), *map(str, paths), "-f", "json", *extra])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout), res.stderr


@pytest.mark.parametrize("score", DIGIT_SCORES)
def test_each_score_ranks_digits_above_what_it_is_for(digits_run, sets, runner, score, tmp_path):
    """likelihood and combined: noise, all rejected; energy: every noise image below the typical digit (its 1%
    threshold sits inside the noise: all of it rejected by some trainings, 55% by this one); complexity: flat
    images (its reason to exist; on noise it fails, as measured on CIFAR-10 in BENCHMARKS.md); confidence: noise
    on the median; knn: every noise image below the median digit."""
    weights = digits_run / "model.safetensors"
    digits, err = _classify(runner, weights, [sets / "digits"], "--reject-score", score)
    assert f"{score} score <" in err
    d = [r["score"] for r in digits]
    if score == "complexity":
        for i, v in enumerate((0, 128, 255)):
            Image.fromarray(np.full((32, 32), v, np.uint8)).save(tmp_path / f"flat{i}.png")
        out, _ = _classify(runner, weights, [tmp_path], "--reject-score", score)
    else:
        out, _ = _classify(runner, weights, [sets / "noise"], "--reject-score", score)
    o = [r["score"] for r in out]
    if score == "confidence":
        assert np.median(d) > np.median(o)
    elif score == "knn":  # the typical digit above every noise image, though not all noise falls below 1%
        assert np.median(d) > np.max(o)
    elif score == "energy":  # every noise image below the typical digit (its 1% threshold: see the docstring)
        assert np.median(d) > np.max(o), (d, o)
    else:
        assert np.median(d) > np.max(o) and all(r["rejected"] for r in out), (d, o)
    again, _ = _classify(runner, weights, [sets / "digits"], "--reject-score", score)
    assert [r["score"] for r in again] == d  # seeded: the same file gives the same score


def test_complexity_term_is_deterministic_per_file(tmp_path):
    a = noise((32, 32), 3)
    Image.fromarray(a).save(tmp_path / "a.png")
    from vae_cli.data.images import load_image

    x = torch.from_numpy(np.stack([load_image(tmp_path / "a.png", 1, (32, 32))] * 2))
    bits = pvalues.png_bits(x)
    assert bits[0] == bits[1] and bits[0] == pvalues.png_bits(x[:1])[0]


def test_unknown_reject_score_is_one_clear_error(digits_run, sets, runner):
    res = runner.invoke(app, ["classify", str(digits_run / "model.safetensors"), str(sets / "noise"),
                              "--reject-score", "likelyhood"])
    assert res.exit_code == 2 and "Traceback" not in res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "--reject-score likelyhood" in lines[0] and "did you mean 'likelihood'" in lines[0]


def test_older_weights_without_components(tmp_path, digits_run, sets, runner):
    """A file calibrated before the scores were named: the likelihood still works, the others say why not."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    src = digits_run / "model.safetensors"
    with safe_open(str(src), "numpy") as f:
        meta = dict(f.metadata())
    cal = json.loads(meta["reject"])
    lik = sorted(cal["components"]["likelihood"])
    old = {"score": "iwae_log_likelihood", "samples": cal["samples"], "rate": cal["rate"],
           "threshold": float(torch.quantile(torch.tensor(lik, dtype=torch.float64), cal["rate"])),
           "holdout_images": cal["holdout_images"], "test_reject_rate": 0.01, "holdout_scores": lik}
    out = tmp_path / "old.safetensors"
    save_file(load_file(str(src)), str(out), metadata={**meta, "reject": json.dumps(old)})
    rows, err = _classify(runner, out, [sets / "noise"], "--reject")
    assert all(r["rejected"] for r in rows) and "likelihood score <" in err
    bad = runner.invoke(app, ["classify", str(out), str(sets / "noise"), "--reject-score", "combined"])
    assert bad.exit_code == 2 and "retrain" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_recipe_picks_the_default_score(tmp_path, runner):
    from tests.conftest import TINY

    res = runner.invoke(app, ["train", str(TINY), "--out", str(tmp_path), "--quiet", "--json",
                              "train.reject_score=confidence"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["reject"]["score"] == "confidence"
    bad = runner.invoke(app, ["train", str(TINY), "--out", str(tmp_path), "train.reject_score=confidense"])
    assert bad.exit_code == 2 and "did you mean 'confidence'" in bad.stderr


def test_eval_ood_reports_every_score_per_set(digits_run, sets, runner):
    weights = str(digits_run / "model.safetensors")
    res = runner.invoke(app, ["eval", weights, "--iw-samples", "0", "--limit", "150", "--json",
                              "--ood", str(sets / "noise"), "--ood", str(sets / "letters"),
                              "--ood", str(sets / "digits")])
    assert res.exit_code == 0, res.output
    ood = json.loads(res.stdout)["ood"]
    assert ood["score"] == "combined" and ood["in_images"] == 150 and ood["rate"] == 0.01
    assert list(ood["sets"]) == [str(sets / "noise"), str(sets / "letters"), str(sets / "digits")]
    assert set(ood["false_reject_rate"]) == set(DIGIT_SCORES)  # rotation: only models with its head
    noise_set = ood["sets"][str(sets / "noise")]
    assert noise_set["images"] == 20
    for name in ("likelihood", "combined"):  # complexity alone misses noise (BENCHMARKS.md)
        assert noise_set["scores"][name]["auroc"] >= 0.95, name
        assert noise_set["scores"][name]["reject_rate"] == 1.0, name
    # held-back digits are no outliers: AUROC near chance for the model's score
    assert 0.3 <= ood["sets"][str(sets / "digits")]["scores"]["combined"]["auroc"] <= 0.75
    table = runner.invoke(app, ["eval", weights, "--iw-samples", "0", "--limit", "100", "--ood", str(sets / "shapes")])
    assert table.exit_code == 0 and "AUROC" in table.stdout and "combined*" in table.stdout


def test_eval_ood_bad_file_is_reported_and_exit_2(digits_run, sets, runner, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    res = runner.invoke(app, ["eval", str(digits_run / "model.safetensors"), "--iw-samples", "0", "--limit", "50",
                              "--ood", str(tmp_path / "broken.png"), "--ood", str(sets / "noise")])
    assert res.exit_code == 2 and "broken.png" in res.stderr and "Traceback" not in res.output


def test_help_texts_name_every_score():
    from vae_cli.cli.app import SCORES_HELP

    assert sorted(SCORES_HELP.split(" | ")) == sorted(reject.SCORES.names())


def test_every_reject_score_has_a_row_in_the_readme_table():
    """`--reject-score NAME` takes any registered score: the README's table of scores is where a user reads what
    each measures and where it fails (the `ratio` row was missing for three sessions)."""
    readme = (ROOT / "README.md").read_text()
    missing = [n for n in reject.SCORES.names() if f"| `{n}` |" not in readme and f"| `{n}` (default) |" not in readme]
    assert missing == []
