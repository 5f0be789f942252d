"""The hierarchical VAE and the logistic-mixture likelihood: the maths against explicit sums, the bound
against its estimator, generation, and a real training of the digits that keeps its classes."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch

from vae_cli.core.recipe import ModelConfig
from vae_cli.data import class_mixed
from vae_cli.models import build_model, losses
from vae_cli.models.hvae import latent_resolutions, resolutions
from vae_cli.models.likelihoods import Logistic, LogisticMixture


def _hvae(shape=(3, 16, 16), **cfg):
    torch.manual_seed(0)
    cfg = {"name": "hvae", "width": 16, "latent_channels": 4, "likelihood": "logistic_mixture", "mixtures": 3,
           "head_hidden": 8, **cfg}
    return build_model(ModelConfig(**cfg), shape, 4).eval()


def test_mixture_probabilities_of_every_colour_sum_to_one():
    """With 4 levels a pixel takes 4^3 colours: their probabilities under the coupled mixture sum to one, so
    the likelihood is a probability of the file, not a density."""
    torch.manual_seed(0)
    lik = LogisticMixture(3, mixtures=3)
    out = torch.randn(1, 3 * 10, 1, 1) * 2
    values = torch.tensor(list(itertools.product(range(4), repeat=3)), dtype=torch.float32) / 3
    x = values.view(64, 3, 1, 1)
    p = torch.exp(-lik.nll(out.expand(64, -1, -1, -1), x, levels=4))
    assert p.sum().item() == pytest.approx(1.0, abs=1e-4)


def _logistic_bin_probability(x, mean, log_scale, levels):
    """The mass of x's bin, written out in float64: CDF(upper edge) - CDF(lower edge), the end bins open."""
    x, mean, s = x.double(), mean.double(), log_scale.double().exp()
    half = 0.5 / (levels - 1)
    cdf = torch.distributions.TransformedDistribution(
        torch.distributions.Uniform(torch.zeros_like(mean), torch.ones_like(mean)),
        [torch.distributions.transforms.SigmoidTransform().inv,
         torch.distributions.transforms.AffineTransform(mean, s)]).cdf  # the logistic distribution's CDF
    upper = torch.where(x >= 1 - half, torch.ones_like(x), cdf(x + half))
    lower = torch.where(x <= half, torch.zeros_like(x), cdf(x - half))
    return upper - lower


def test_one_grey_component_is_the_discretised_logistic():
    """M=1 on grey images reduces to one discretised logistic per pixel: each pixel's bin mass, written out."""
    torch.manual_seed(1)
    x = torch.randint(0, 256, (4, 1, 5, 5)).float() / 255
    # means near the pixels, scales from 2 bins to a seventh of the range: every mass well inside float64
    mean, log_scale = x + 0.01 * torch.randn(4, 1, 5, 5), torch.rand(4, 1, 5, 5) * 3 - 5
    out = torch.cat([torch.zeros(4, 1, 5, 5), mean - 0.5, log_scale], 1)  # logit, mean (stored - 0.5), scale
    want = -_logistic_bin_probability(x, mean, log_scale, 256).log().flatten(1).sum(1)
    assert torch.isfinite(want).all()
    assert torch.allclose(LogisticMixture(1, 1).nll(out, x).double(), want, rtol=1e-5, atol=1e-3)
    # and so does the `logistic` likelihood (one logistic per pixel, its mean through a sigmoid)
    inside = mean.clamp(0.01, 0.99)
    got = Logistic(1).eval()
    with torch.no_grad():
        got.log_scale.fill_(-3.0)
    want = -_logistic_bin_probability(x, inside, torch.full_like(x, -3.0), 256).log().flatten(1).sum(1)
    assert torch.allclose(got.nll(torch.logit(inside), x).double(), want, rtol=1e-4)


def test_branch_free_bin_mass_matches_the_reference_form():
    torch.manual_seed(2)
    x = torch.randint(0, 256, (3, 2, 4, 4)).float() / 255
    mean, log_scale = torch.rand(3, 2, 4, 4), torch.randn(3, 2, 4, 4) - 2
    ref = losses.discretized_logistic_logp(x, mean, log_scale, 256)
    ok = ref > math.log(1e-4)  # where the reference does not fall back to the density
    assert torch.allclose(losses.log_bin_mass(x, mean, log_scale, 256)[ok], ref[ok], atol=1e-3)


def test_the_kl_against_a_learned_prior_matches_torch_distributions():
    torch.manual_seed(3)
    mq, lq, mp, lp = (torch.randn(5, 2, 3, 3) for _ in range(4))
    want = torch.distributions.kl_divergence(torch.distributions.Normal(mq, (0.5 * lq).exp()),
                                             torch.distributions.Normal(mp, (0.5 * lp).exp())).flatten(1).sum(1)
    assert torch.allclose(losses.gaussian_kl_two(mq, lq, mp, lp), want, rtol=1e-5, atol=1e-4)


def test_ladder_resolutions():
    assert resolutions(32, 32) == [(32, 32), (16, 16), (8, 8), (4, 4)]
    assert latent_resolutions(32, 32, 3) == [(4, 4), (8, 8), (16, 16)]
    assert latent_resolutions(28, 28, 3) == [(7, 7), (14, 14)]  # the image's own size never holds latents
    assert latent_resolutions(8, 8, 2) == [(4, 4)]


@pytest.mark.parametrize("name", ["hvae", "m2h"])
def test_mean_log_weight_is_the_elbo(name):
    """E_q[log p(x, z) - log q(z|x)] is the ELBO: the importance weights (sampled log-ratios) and the training
    bound (KL in closed form) are two estimators of one number. For m2h, y ~ q(y|x) is drawn in the weights and
    enumerated in the bound (with KL(q(y|x) || p(y))): still one number."""
    model = _hvae(name=name, **({"decoder_width": 16, "width": 8, "head_hidden": 0} if name == "m2h" else {}))
    x = torch.randint(0, 256, (2, 3, 16, 16)).float() / 255
    with torch.no_grad():
        torch.manual_seed(4)
        lw = model.log_weights(x, 400)
        elbo = torch.stack([-(p["recon"] + p["kl"]) for p in (model.elbo_parts(x) for _ in range(200))])
    se = lw.std(1) / 20 + elbo.std(0) / math.sqrt(200)
    assert ((lw.mean(1) - elbo.mean(0)).abs() < 4 * se + 1e-3).all()
    iwae = losses.iwae_bound(lw)
    assert (iwae >= lw.mean(1)).all()  # the importance-weighted bound is the tighter one


def test_generation_temperature_and_codes():
    model = _hvae()
    x = torch.rand(3, 3, 16, 16)
    with torch.no_grad():
        torch.manual_seed(0)
        cold_a = model.sample(2, temperature=0.0)
        torch.manual_seed(1)
        cold_b, warm = model.sample(2, temperature=0.0), model.sample(2, temperature=1.0)
        z = model.latent_means(x)
        assert torch.equal(cold_a, cold_b) and not torch.equal(cold_a, warm)
        assert z.shape == (3, model.latent_size) == (3, 2 * 4 * 4 * 4)  # depth 2 groups of 4 channels at 4x4
        assert model.decode_latents(z).shape == (3, 3, 16, 16)
        assert model.reconstruct(x).shape == (3, 3, 16, 16)
        # reconstructions come from the codes alone: the same codes, the same picture
        assert torch.allclose(model.reconstruct(x), model.reconstruct(x))


def test_class_mixed_deals_the_classes_out_in_turn():
    y = np.repeat(np.arange(4), [50, 30, 60, 20])
    first = y[class_mixed(y, 40)]
    assert sorted(np.bincount(first).tolist()) == [10, 10, 10, 10]
    assert np.array_equal(class_mixed(y, 40), class_mixed(y, 40))
    assert sorted(class_mixed(y).tolist()) == list(range(len(y)))


@pytest.fixture(scope="module")
def hvae_digits(tmp_path_factory, runner):
    from vae_cli.cli import app

    out = tmp_path_factory.mktemp("hvae")
    # the digits recipe's Gaussian likelihood: with a 3-component logistic mixture the 8x8 digits' pixels are
    # explained without the latents (KL 0.007 nats after 30 epochs, accuracy at chance; README, `hvae`)
    res = runner.invoke(app, ["train", "recipes/digits.yaml", "model.name=hvae", "model.width=32",
                              "model.latent_channels=4", "train.epochs=20", "train.grad_skip=10", "--name", "h",
                              "--out", str(out), "--json", "--quiet"])
    assert res.exit_code == 0, res.output
    return out / "h"


def test_hvae_trains_on_digits_and_its_pictures_keep_their_class(hvae_digits, runner):
    """A real training: the likelihood beats uniform noise by a wide margin (log2 17 = 4.09 bits/dim for the
    digits' 17 levels) and the model's classifier recognises its own reconstructions and class samples
    (measured: 2.70 bits/dim, accuracy 0.82, on reconstructions 0.78, on class samples 0.77)."""
    from vae_cli.cli import app

    res = runner.invoke(app, ["eval", str(hvae_digits / "model.safetensors"), "--json", "-k", "20", "--quiet"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["nll"]["discrete"] and out["nll"]["bits_per_dim"] < 3.0
    assert out["accuracy"] > 0.7
    assert out["recon_accuracy"] > 0.6
    assert out["sample_accuracy"] > 0.4
    rows = (hvae_digits / "metrics.csv").read_text().splitlines()
    assert "train_grad_skipped" in rows[0]
    html = (hvae_digits / "report.html").read_text()
    assert "accuracy on reconstructions" in html and "accuracy of class-conditional samples" in html
    info = runner.invoke(app, ["info", str(hvae_digits / "model.safetensors"), "--json"])
    assert info.exit_code == 0, info.output
    # 8x8 digits have latents at one resolution (4x4): no levels to compare, so no `ratio` score is stored
    assert "ratio" not in json.loads(info.stdout)["reject"]["components"]


def _ladder(name, **cfg):
    """A small `hvae`, or an `m2h` (whose ladder is p(x|y,z)) of the same shape."""
    return _hvae(name=name, **({"decoder_width": 16, "width": 8, "head_hidden": 0} if name == "m2h" else {}), **cfg)


@pytest.mark.parametrize("name", ["hvae", "m2h"])
def test_level_ratio_only_from_a_hierarchy(name):
    flat = build_model(ModelConfig(name="vae", width=8, latent_dim=4, hidden=16), (3, 16, 16), 4).eval()
    one_level = _ladder(name, latent_levels=1)
    model = _ladder(name)
    x = torch.rand(3, 3, 16, 16)
    with torch.no_grad():
        assert flat.level_ratio(x, 2) is None and not flat.has_hierarchy
        assert one_level.level_ratio(x, 2) is None and not one_level.has_hierarchy
        r = model.level_ratio(x, 4)
        torch.manual_seed(3)
        full = model.log_weights(x, 64)
        torch.manual_seed(3)
        top = model.log_weights(x, 64, prior_from=model.cfg.depth)  # the 4x4 groups from q, the 8x8 from p
    assert model.has_hierarchy and r.shape == (3,) and torch.isfinite(r).all()
    # the same random numbers, so the weights differ only if the 8x8 groups really came from their prior
    assert torch.isfinite(top).all() and not torch.allclose(top, full)


@pytest.mark.parametrize("name", ["hvae", "m2h"])
def test_a_hierarchy_is_calibrated_for_the_ratio_score(name):
    """The `--reject` calibration of a model with latents at two resolutions stores the ratio score's held-out
    values (and its threshold can be rebuilt from them); a one-level model's lacks it."""
    from vae_cli.core.runtime import Runtime
    from vae_cli.evaluation import reject

    rt = Runtime(torch.device("cpu"), "fp32")
    held, test = torch.rand(12, 3, 16, 16), torch.rand(6, 3, 16, 16)
    cal, _ = reject.calibrate(_ladder(name), held, test, rt, rate=0.1, samples=2, seed=0, default="ratio")
    assert len(cal["components"]["ratio"]) == 12 and math.isfinite(cal["threshold"])
    flat, _ = reject.calibrate(_ladder(name, latent_levels=1), held, test, rt, rate=0.1, samples=2, seed=0,
                               default="likelihood")
    assert "ratio" not in flat["components"]
    assert reject.unavailable("ratio", _ladder(name, latent_levels=1), 12) is not None
    assert reject.unavailable("ratio", _ladder(name), 12) is None


@pytest.mark.parametrize("name", ["hvae", "m2h"])
def test_the_ratio_reuses_the_likelihoods_bound(name):
    """Measured beside the `likelihood` score (as calibration does), the ratio takes the whole model's bound
    from that pass: the ladder runs the full bound once, and ratio + log p(x) is the top levels' bound."""
    from vae_cli.core.runtime import Runtime
    from vae_cli.evaluation import reject
    from vae_cli.evaluation.evaluate import level_ratio

    rt, model, x = Runtime(torch.device("cpu"), "fp32"), _ladder(name), torch.rand(5, 3, 16, 16)
    calls = {"full": 0, "top": 0}
    inner = model.log_weights

    def counted(xb, k, levels=None, prior_from=None):
        calls["full" if prior_from is None else "top"] += 1
        return inner(xb, k, levels, prior_from=prior_from)

    model.log_weights = counted
    both = reject.measure(model, x, rt, samples=3, seed=7, parts={"log_px", "levels"})
    assert calls == {"full": 1, "top": 1}  # one batch: one pass each, where there were two full ones
    top = level_ratio(model, x, 3, rt, seed=7 + reject.TOP_DRAWS, full=torch.zeros(5))  # the top bound, same draws
    assert torch.allclose(both["levels"] + both["log_px"], top, atol=1e-4)
    alone = reject.measure(model, x, rt, samples=3, seed=7, parts={"levels"})  # `--reject-score ratio` alone
    assert torch.isfinite(alone["levels"]).all() and calls["full"] == 2


@pytest.mark.parametrize("overrides, needle", [
    (["model.name=vae", "model.depth=3"], "model 'vae' does not read model.depth"),
    (["model.name=hvae", "model.consistency=50"], "model 'hvae' does not read model.consistency"),
    (["model.name=vae", "model.iw_samples=3"], "model 'vae' does not read model.iw_samples"),
    (["model.likelihood=logistic", "model.mixtures=5"], "model.mixtures is read only by"),
])
def test_a_key_the_model_does_not_read_is_refused(overrides, needle):
    from vae_cli.core.errors import RecipeError
    from vae_cli.core.recipe import load

    with pytest.raises(RecipeError, match=needle):
        load(None, overrides)
    load(None, ["model.name=iwae", "model.iw_samples=3"])  # the model that reads it takes it
    load(None, ["model.name=hvae", "model.depth=3", "model.likelihood=logistic_mixture", "model.mixtures=5"])


def test_info_models_lists_each_models_keys(runner):
    from vae_cli.cli import app

    res = runner.invoke(app, ["info", "--models"])
    assert res.exit_code == 0, res.output
    block = res.stdout.split("hvae\t", 1)[1].split("\n")[1]
    assert "model.latent_channels" in block and "model.depth" in block and "model.alpha" not in block


@pytest.fixture(scope="module")
def m2h_digits(tmp_path_factory, runner):
    from vae_cli.cli import app

    out = tmp_path_factory.mktemp("m2h")
    res = runner.invoke(app, ["train", "recipes/digits.yaml", "model.name=m2h", "model.latent_channels=4",
                              "model.decoder_width=32", "model.head_hidden=0", "model.alpha=100",
                              "model.consistency=50", "data.labels_per_class=10", "train.augment_shift=1",
                              "train.epochs=8", "--name", "m", "--out", str(out), "--json", "--quiet"])
    assert res.exit_code == 0, res.output
    return out / "m"


def test_m2h_learns_from_few_labels_and_reconstructs_its_classes(m2h_digits, runner):
    """M2 with the ladder as p(x|y,z), trained on the smooth bound with 10 labels a class: it classifies, models
    the images better than uniform noise, and its reconstructions keep their class in its own classifier's eyes."""
    from vae_cli.cli import app

    res = runner.invoke(app, ["eval", str(m2h_digits / "model.safetensors"), "--json", "-k", "5", "--quiet"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    # measured at 8 epochs: accuracy 0.91, on reconstructions 0.59, bits/dim 3.57 (30 epochs: 0.89 / 0.88 / 3.12).
    # Its class samples are not asserted: 0.14 at 8 epochs, 0.26 at 30 (the decoder learns to read y slowly)
    assert out["accuracy"] > 0.8
    assert out["recon_accuracy"] > 0.45
    assert out["nll"]["bits_per_dim"] < math.log2(17)  # uniform over the digits' 17 levels
    assert 0.0 <= out["sample_accuracy"] <= 1.0


def test_m2h_smooth_bound_with_a_certain_prediction_is_the_labelled_bound():
    """SHOT-VAE's smooth bound decodes once under q(y|x); when q is one-hot it is the labelled -L(x, y) (the
    KL(q(y|x) || p(y)) = log K there is the labelled bound's -log p(y)), draw for draw."""
    model = _hvae(name="m2h", width=8, decoder_width=16, head_hidden=0)
    x, y = torch.rand(3, 3, 16, 16), torch.tensor([0, 2, 3])
    with torch.no_grad():
        torch.manual_seed(5)
        smooth, _, _ = model.unlabelled_bound(x, None, torch.nn.functional.one_hot(y, 4).float(), 1.0)
        torch.manual_seed(5)
        labelled = model.neg_elbo(x, None, y)["value"]
    assert torch.allclose(smooth, labelled, rtol=1e-6, atol=1e-3)


def test_m2h_evaluation_bound_is_eq7_in_expectation_at_one_ladder_pass_an_image():
    """`elbo_parts` draws y ~ q(y|x) instead of decoding every class: the ladder sees each image once (the
    enumeration sent B*K rows through it, K times the cost of the per-epoch test numbers), y follows q(y|x),
    and the KL adds KL(q(y|x) || p(y)) to the drawn class's terms, so the mean over draws is M2's eq. 7,
    sum_y q(y|x) -L(x, y) - H(q). The ladder is replaced by a stand-in whose terms name the class it was told
    (the real ladder's noise, ~9 nats a draw, would hide a wrong log K; test_mean_log_weight_is_the_elbo ties
    the real one to the importance weights)."""
    model = _hvae(name="m2h", width=8, decoder_width=16, head_hidden=0)
    x = torch.rand(2, 3, 16, 16)
    q = torch.tensor([[0.7, 0.2, 0.05, 0.05], [0.1, 0.1, 0.1, 0.7]])
    rows = []

    def ladder(xb, y):  # one row per image told one class: recon 100 c, KL 10 c
        assert y.shape == (len(xb), 4) and torch.equal(y.sum(1), torch.ones(len(xb)))
        rows.append(len(xb))
        c = y.argmax(1).float()
        return 100 * c, 10 * c

    model.class_logits, model.gen.neg_elbo_parts = (lambda h: q.log()), ladder
    torch.manual_seed(3)
    with torch.no_grad():
        parts = [model.elbo_parts(x) for _ in range(2000)]
    assert rows == [2] * 2000
    c = torch.stack([p["recon"] for p in parts]) / 100  # the drawn classes, (draws, images)
    kl_y = (q * q.log()).sum(1) + math.log(4)
    for p, ci in zip(parts, c):
        assert torch.allclose(p["kl"], 10 * ci + kl_y, atol=1e-4)
    freq = torch.stack([(c == k).float().mean(0) for k in range(4)], 1)
    assert (freq - q).abs().max() < 0.04, freq
    neg_l = 110 * torch.arange(4.0) + math.log(4)  # -L(x, y) of the stand-in, its log p(y) included
    eq7 = (q * neg_l).sum(1) - -(q * q.log()).sum(1)
    estimate = torch.stack([p["recon"] + p["kl"] for p in parts]).mean(0)
    assert torch.allclose(estimate, eq7, atol=4 * 110 / math.sqrt(2000)), (estimate, eq7)


@pytest.mark.parametrize("share", [1.0, 0.5])
def test_m2h_ladder_images_caps_the_ladder_not_what_the_classifier_sees(share):
    """`model.ladder_images` caps the images of each kind a step sends through the ladder (the first ones of the
    random labelled draw and of the `unlabelled_elbo_images`), in proportion to a shard's share, while the
    trunk, q(y|x) and the self-supervised tasks still see every labelled image and all `unlabelled_elbo_images`
    (one key for both made m2h's classifier see fewer images than m2's, session 21)."""
    from vae_cli.models.base import Batch

    model = _hvae(name="m2h", width=8, decoder_width=16, head_hidden=0, unlabelled_elbo_images=12,
                  ladder_images=4, rotation=1.0, alpha=1.0).train()
    ladder_rows, trunk_rows = [], []
    real_ladder, real_trunk = model.gen.neg_elbo_parts, model.trunk.forward

    def ladder(x, y=None):
        ladder_rows.append(len(x))
        return real_ladder(x, y)

    def trunk(x):
        trunk_rows.append(len(x))
        return real_trunk(x)

    model.gen.neg_elbo_parts, model.trunk.forward = ladder, trunk
    x = torch.rand(16, 3, 16, 16)
    batch = Batch(x=x, y=torch.zeros(16, dtype=torch.long), labelled=torch.zeros(16, dtype=torch.bool),
                  x_lab=torch.rand(10, 3, 16, 16), y_lab=torch.arange(10) % 4, share=share)
    torch.manual_seed(0)
    terms = model.loss(batch, 1.0)
    cap, n = math.ceil(4 * share), math.ceil(12 * share)
    assert ladder_rows == [cap, cap]  # the labelled bound, then the smooth one
    assert trunk_rows == [10, n, 10 + n]  # labelled, unlabelled with gradients, the tasks on both
    assert torch.isfinite(terms["loss"]) and "rotation" in terms
    terms["loss"].backward()
    assert model.gen.h0.grad is not None and model.classifier[-1].weight.grad.abs().sum() > 0


def test_ladder_images_is_refused_for_a_model_without_a_ladder():
    from vae_cli.core import recipe
    from vae_cli.core.errors import RecipeError

    with pytest.raises(RecipeError, match="model 'm2' does not read model.ladder_images"):
        recipe.load("recipes/cifar10-4000-labels-m2.yaml", ["model.ladder_images=8"])
    assert recipe.load("recipes/cifar10-4000-labels.yaml", ["model.ladder_images=8"]).model.ladder_images == 8


def test_grad_skip_skips_updates_far_above_the_running_norm(tmp_path, runner):
    """train.grad_skip=0.01 skips every update whose norm is above 1% of the running average of the accepted ones
    (all of them, once the first 50 steps have made the average) and says so in metrics.csv; at the default (0)
    nothing is skipped and no column is written."""
    import csv

    from vae_cli.cli import app

    def run(name: str, *extra: str) -> list[dict]:
        res = runner.invoke(app, ["train", "tiny", "--out", str(tmp_path), "--name", name, "--quiet", "epochs=10",
                                  *extra])
        assert res.exit_code == 0, res.output
        with open(tmp_path / name / "metrics.csv", newline="") as f:
            return list(csv.DictReader(f))

    rows = run("skip", "train.grad_skip=0.01", "epochs=12")
    skipped = [float(r["train_grad_skipped"]) for r in rows]
    assert skipped[0] == 0.0 and skipped[-1] > 0.9  # none in the first 50 steps (6 an epoch), then nearly all
    assert "train_grad_skipped" not in run("plain")[0]


def test_the_iwae_pass_decodes_fewer_rows_at_once_for_a_heavy_likelihood():
    from vae_cli.evaluation.evaluate import iwae_rows

    heavy = _hvae(shape=(3, 32, 32), mixtures=10)  # 100 parameters a pixel
    light = build_model(ModelConfig(name="vae", width=8, latent_dim=4, hidden=16), (1, 8, 8), 4)
    assert iwae_rows(heavy, torch.device("cuda")) == 2**28 // (100 * 32 * 32) < 8192
    assert iwae_rows(heavy) == 64  # on the CPU a chunk stays under glibc's mmap threshold (32 MB)
    assert iwae_rows(light) == iwae_rows(light, torch.device("cuda")) == 8192
