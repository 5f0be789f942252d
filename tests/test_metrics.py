"""Evaluation numbers: the pure functions against hand-computed values, and `vae eval --json` against
its documented contract (docs/METRICS.md)."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch

from tests.conftest import ROOT
from vae_cli.cli import app
from vae_cli.evaluation import metrics
from vae_cli.models import losses


def test_iwae_bound_is_log_mean_exp():
    log_w = torch.tensor([[0.0, math.log(3.0)], [-1.0, -1.0]])
    assert torch.allclose(losses.iwae_bound(log_w), torch.tensor([math.log(2.0), -1.0]))
    assert torch.allclose(losses.iwae_bound(log_w[:, :1]), log_w[:, 0])  # K = 1: the ELBO's estimate


class _TableModel:
    """A stand-in whose log-weights come from a fixed table, in the order they are asked for."""

    def __init__(self, table: torch.Tensor):
        self.table, self.used = table, 0

    def log_weights(self, x, k, levels=None):
        out = self.table[:, self.used:self.used + k]
        self.used += k
        return out


@pytest.mark.parametrize("max_rows", [1, 3, 7, 10_000])
def test_iwae_chunks_combine_exactly(max_rows):
    """K = 5000 is drawn in chunks; the running logsumexp must equal the one-shot bound."""
    table = torch.randn(2, 50) * 30
    got = metrics.iwae_log_likelihood(_TableModel(table), torch.zeros(2, 1), 50, None, _no_autocast,
                                      max_rows=max_rows)
    assert torch.allclose(got, losses.iwae_bound(table), atol=1e-4)


def _no_autocast():
    return torch.autocast("cpu", enabled=False)


def test_gaussian_log_density_matches_torch():
    z, mu, logvar = torch.randn(4, 3), torch.randn(4, 3), torch.randn(4, 3)
    ref = torch.distributions.Normal(mu, torch.exp(0.5 * logvar)).log_prob(z).sum(1)
    assert torch.allclose(losses.gaussian_log_density(z, mu, logvar), ref, atol=1e-5)


@pytest.mark.parametrize("levels", [2, 17, 256])
def test_discretized_gaussian_is_a_distribution(levels):
    """The masses of all `levels` values of one pixel sum to one, whatever the mean and scale."""
    grid = torch.linspace(0, 1, levels).view(levels, 1)
    for mean, log_scale in ((0.3, -2.0), (0.99, -5.0), (0.0, 0.5)):
        nll = losses.discretized_gaussian_nll(torch.full_like(grid, mean), torch.tensor(log_scale), grid, levels)
        assert torch.exp(-nll).sum().item() == pytest.approx(1.0, abs=1e-4)


def test_bits_per_dim():
    assert metrics.bits_per_dim(784 * math.log(2.0), 784) == pytest.approx(1.0)


def test_active_units_counts_varying_dimensions():
    means = torch.zeros(500, 6)
    means[:, :3] = torch.randn(500, 3)  # variance ~1 > 0.01
    means[:, 3] = torch.randn(500) * 0.01  # variance 1e-4: collapsed
    assert metrics.active_units(means) == 3


def test_ece_of_calibrated_and_overconfident_predictions():
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    perfect = np.eye(2)[y]  # confidence 1, always right
    assert metrics.expected_calibration_error(perfect, y) == pytest.approx(0.0)
    wrong = np.eye(2)[1 - y] * 0.9 + 0.05  # confidence 0.95, always wrong
    assert metrics.expected_calibration_error(wrong, y) == pytest.approx(0.95)
    half = np.tile([0.75, 0.25], (8, 1))  # confidence 0.75, right half the time
    assert metrics.expected_calibration_error(half, y) == pytest.approx(0.25)


def test_classification_report_by_hand():
    y = np.array([0, 0, 1, 1, 2])
    pred = np.array([0, 1, 1, 1, 0])
    res = metrics.classification(np.eye(3)[pred], y, ["a", "b", "c"])
    assert res["accuracy"] == pytest.approx(3 / 5)
    assert res["per_class"]["a"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert res["per_class"]["b"]["precision"] == pytest.approx(2 / 3) and res["per_class"]["b"]["recall"] == 1.0
    assert res["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert res["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]


def test_latent_probe_separates_clusters():
    rng = np.random.RandomState(0)
    centres = rng.randn(3, 8) * 10
    ytr, yte = np.repeat(np.arange(3), 5), np.repeat(np.arange(3), 50)
    res = metrics.latent_probe(centres[ytr] + rng.randn(15, 8), ytr, centres[yte] + rng.randn(150, 8), yte)
    assert res["linear_accuracy"] == 1.0 and res["knn_accuracy"] == 1.0 and res["knn_k"] == 5


def _documented_keys() -> dict[str, set[str]]:
    """The keys in docs/METRICS.md's tables, by section (top level, nll, probe)."""
    sections: dict[str, set[str]] = {}
    current = None
    for line in (ROOT / "docs" / "METRICS.md").read_text().splitlines():
        if line.startswith("## "):
            current = line[3:].strip().strip("`")
        m = re.match(r"\| `(\w+)` \|", line)
        if m and current:
            sections.setdefault(current, set()).add(m.group(1))
    return sections


def test_eval_json_keys_are_the_documented_ones(tiny_run, runner):
    res = runner.invoke(app, ["eval", str(tiny_run / "model.safetensors"), "--json", "--iw-samples", "20",
                              "--probe-labels", "3"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    doc = _documented_keys()
    assert set(out) == doc["Top level"]
    assert set(out["nll"]) == doc["nll"]
    assert set(out["probe"]) == doc["probe"]
    assert set(out["per_class"]["0"]) == {"precision", "recall", "f1", "support"}
    n = out["nll"]
    assert n["bits_per_dim"] == pytest.approx(n["nats"] / (64 * math.log(2)))
    assert n["levels"] == 17 and n["discrete"] is False  # tiny.yaml: Bernoulli on grey digits
    assert out["probe"]["labels_per_class"] == 3 and 0.0 <= out["probe"]["linear_accuracy"] <= 1.0
    # without the options: null, not missing
    plain = json.loads(runner.invoke(app, ["eval", str(tiny_run / "model.safetensors"), "--json",
                                           "--iw-samples", "0"]).stdout)
    assert plain["nll"] is None and plain["probe"] is None and set(plain) == doc["Top level"]


def _eval_json(runner, weights, *args):
    res = runner.invoke(app, ["eval", str(weights), "--json", *args])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def test_iwae_is_tighter_than_the_elbo_and_improves_with_k(tiny_run, digits_run, runner):
    """On a Bernoulli model both are in the same units: NLL_k=1 ~ -ELBO; a model whose posterior is not its
    prior (the digits; the tiny 2-epoch model's is, so its k=1 and k=200 differ by noise) gains with k."""
    one = _eval_json(runner, tiny_run / "model.safetensors", "--iw-samples", "1")
    assert one["nll"]["nats"] == pytest.approx(-one["elbo"], rel=0.05)  # K = 1 is an ELBO estimate
    weights = digits_run / "model.safetensors"
    one, many = (_eval_json(runner, weights, "--iw-samples", k)["nll"] for k in ("1", "200"))
    assert many["nats"] < one["nats"] - 1.0
    # the same seed gives the same estimate
    assert _eval_json(runner, weights, "--iw-samples", "200")["nll"]["nats"] == many["nats"]


def test_discretised_gaussian_eval_reports_a_discrete_likelihood(digits_run, runner):
    """The digits recipe's Gaussian decoder, scored as a probability of the 17-level pixel values."""
    res = runner.invoke(app, ["eval", str(digits_run / "model.safetensors"), "--json", "--iw-samples", "50"])
    assert res.exit_code == 0, res.output
    n = json.loads(res.stdout)["nll"]
    assert n["discrete"] is True and n["levels"] == 17
    # a probability, so positive nats; and a trained model beats the uniform one (64 pixels x ln 17)
    assert 0.0 < n["nats"] < 64 * math.log(17)


def test_iwae_converges_to_the_exact_likelihood_of_a_2d_latent_model():
    """With a 2-D latent code, log p(x) = log ∫ p(x|z) p(z) dz can be computed by quadrature on a grid; the
    IWAE estimate must approach it from below as K grows (Burda et al. 2016, theorem 1)."""
    from vae_cli.core.recipe import ModelConfig
    from vae_cli.models import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(latent_dim=2, width=8, hidden=32, head_hidden=16), (1, 8, 8), 10).eval()
    x = torch.bernoulli(torch.full((3, 1, 8, 8), 0.3))
    step = 0.05
    g = torch.arange(-7.0, 7.0 + 1e-6, step)
    z = torch.cartesian_prod(g, g)  # (G, 2)
    with torch.no_grad():
        logits = torch.cat([model.decoder(c) for c in z.split(8192)])
        log_prior = losses.gaussian_log_density(z, torch.zeros_like(z), torch.zeros_like(z))
        exact = []
        for xi in x:
            log_lik = -losses.bernoulli_nll(logits, xi.expand_as(logits))
            exact.append(torch.logsumexp(log_lik + log_prior, 0) + 2 * math.log(step))
        exact = torch.stack(exact)

        def iwae(k):
            torch.manual_seed(1)
            return metrics.iwae_log_likelihood(model, x, k, None, _no_autocast)

        k1, k5000 = iwae(1), iwae(5000)
    assert torch.allclose(k5000, exact, atol=0.05), (k5000, exact)
    assert (k1 < exact + 0.05).all()


def test_eval_reports_iwae_progress_on_stderr_only(tiny_run, runner):
    weights = str(tiny_run / "model.safetensors")
    res = runner.invoke(app, ["eval", weights, "--json", "--iw-samples", "5"])
    assert res.exit_code == 0 and json.loads(res.stdout)["nll"]["iw_samples"] == 5  # stdout: only the JSON
    assert "IWAE K=5: 359/359 images" in res.stderr
    quiet = runner.invoke(app, ["eval", weights, "--json", "--iw-samples", "5", "--quiet"])
    assert quiet.exit_code == 0 and quiet.stderr == ""
