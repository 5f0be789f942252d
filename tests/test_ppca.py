"""Class-conditional samples of a ladder from a per-class PPCA over every latent group (`models/ppca.py`): the
closed-form fit against a Gaussian of known covariance, the samples against the density, and weights files from
before the density, which still load and sample."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from vae_cli.core.recipe import ModelConfig
from vae_cli.models import build_model
from vae_cli.models.ppca import OVERSAMPLE, ppca_draw, ppca_fit, top_eigen


def test_ppca_fit_recovers_a_low_rank_gaussian():
    """Data from N(mu, A^T A + s2 I) with A of rank 3 in 20 dimensions: the maximum-likelihood fit (Tipping &
    Bishop 1999) gives back the covariance and the noise, and its draws have that covariance."""
    g = torch.Generator().manual_seed(0)
    d, n = 20, 20000
    a = torch.randn(3, d, generator=g) * torch.tensor([3.0, 2.0, 1.5])[:, None]
    mu = torch.randn(d, generator=g)
    x = mu + torch.randn(n, 3, generator=g) @ a + 0.3 * torch.randn(n, d, generator=g)
    cov = a.T @ a + 0.09 * torch.eye(d)
    mean, w, s2 = ppca_fit(x, 3)
    assert w.shape == (3, d)
    assert torch.allclose(mean, mu, atol=0.1)
    assert s2.item() == pytest.approx(0.09, rel=0.05)
    fitted = w.T @ w + s2 * torch.eye(d)
    assert (fitted - cov).norm() / cov.norm() < 0.05
    torch.manual_seed(1)
    draws = ppca_draw(mean.expand(n, d), w.expand(n, 3, d), s2.expand(n), 1.0)
    assert (torch.cov(draws.T) - cov).norm() / cov.norm() < 0.05
    # temperature 0: the mean itself
    assert torch.equal(ppca_draw(mean[None], w[None], s2[None], 0.0)[0], mean)
    # fewer rows than the rank asks: the rank follows the data (n - 1 directions), never past it
    _, w2, _ = ppca_fit(x[:4], 32)
    assert w2.shape == (3, d)


def test_the_randomised_eigenpairs_are_the_exact_ones():
    """Codes wider than the sketch (every label of a class: thousands of rows of thousands of numbers) take the
    randomised SVD: its eigenvalues and directions are the exact SVD's, the same on every call, and it draws
    nothing from torch's global random state."""
    g = torch.Generator().manual_seed(2)
    n, d, r = 400, 600, 8
    assert min(n, d) > 2 * (r + OVERSAMPLE)  # the randomised path
    x = (torch.randn(n, 40, generator=g) * torch.linspace(4, 0.5, 40)) @ torch.randn(40, d, generator=g)
    xc = (x + 0.2 * torch.randn(n, d, generator=g)).double()
    xc -= xc.mean(0)
    _, s, vh = torch.linalg.svd(xc, full_matrices=False)
    torch.manual_seed(5)
    before = torch.get_rng_state()
    lam, vecs = top_eigen(xc, r)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.allclose(lam, s[:r] ** 2 / n, rtol=1e-8)
    assert torch.allclose((vecs * vh[:r]).sum(1).abs(), torch.ones(r, dtype=torch.float64), atol=1e-8)
    again, _ = top_eigen(xc, r)
    assert torch.equal(again, lam)
    _, _, s2 = ppca_fit(xc, r)  # the noise: the mean of every discarded eigenvalue, from the trace
    assert s2.item() == pytest.approx(((s[r:] ** 2 / n).sum() / (d - r)).item(), rel=1e-5)


def _ladder(name):
    torch.manual_seed(0)
    cfg = {"name": name, "width": 8, "latent_channels": 4, "likelihood": "logistic_mixture", "mixtures": 3,
           "head_hidden": 0, **({"decoder_width": 16} if name == "m2h" else {})}
    return build_model(ModelConfig(**cfg), (3, 16, 16), 3).eval()


@pytest.mark.parametrize("name", ["hvae", "m2h"])
def test_class_samples_decode_codes_of_their_class_at_every_group(name):
    """After the fit each class has its own density over all the groups' codes (4x4 and 8x8 here): a sample
    at temperature 0 is the decoded mean code of its class."""
    model = _ladder(name)
    ladder = model.gen if name == "m2h" else model
    assert not model.has_code_density
    torch.manual_seed(1)
    x, y = torch.rand(30, 3, 16, 16), torch.arange(3).repeat_interleave(10)
    x[y == 1] *= 0.3  # the classes differ in what the encoder sees
    model.fit_classifier(x, y, 0, 16)
    assert model.has_code_density and model.code_mean.shape == (3, ladder.codes_dim)
    assert ladder.codes_dim > ladder.code_dim  # more than the coarsest groups
    assert torch.all(model.code_noise > 0) and model.code_basis[0].float().abs().sum() > 0
    with torch.no_grad():
        cls = torch.tensor([0, 1, 2])
        pics = model.sample(3, cls, temperature=0.0)
        extra = {"y": torch.eye(3)} if name == "m2h" else {}
        want = ladder.draw(3, 0.0, top_codes=model.code_mean[cls], **extra)
        assert torch.allclose(pics, want, atol=1e-5)
        torch.manual_seed(2)
        warm = model.sample(6, torch.tensor([1] * 6), temperature=1.0)
    assert (model.code_mean[0] - model.code_mean[1]).abs().max() > 1e-3  # each class its own codes
    assert warm.shape == (6, 3, 16, 16) and warm.std(0).mean() > 0  # temperature 1 varies around the mean


def test_unconditional_samples_of_a_fitted_ladder_come_from_the_class_mixture():
    """`vae sample` without --class on an hvae whose densities are fitted draws the classes in turn from their
    PPCAs (m2h did already): at temperature 0, class i's mean code decoded; before the fit, the ladder's prior."""
    model = _ladder("hvae")
    with torch.no_grad():
        prior = model.sample(3, temperature=0.0)
        assert torch.allclose(prior, model.draw(3, 0.0))
    torch.manual_seed(1)
    x, y = torch.rand(30, 3, 16, 16), torch.arange(3).repeat_interleave(10)
    x[y == 1] *= 0.3
    model.fit_classifier(x, y, 0, 16)
    with torch.no_grad():
        mixed = model.sample(6, temperature=0.0)
        want = model.sample(6, torch.tensor([0, 1, 2, 0, 1, 2]), temperature=0.0)
    assert torch.allclose(mixed, want) and not torch.allclose(mixed[:3], prior, atol=1e-3)


def test_hvae_fits_head_codes_and_density_from_one_ladder_pass():
    """The M1 head's statistics and class codes come from the same pass as the PPCA (the coarsest codes are
    the first of every group's): the encoder runs once a batch, and they equal what `latent_posterior` gives."""
    from vae_cli.models.vae import M1Head

    model, twin = _ladder("hvae"), _ladder("hvae")
    torch.manual_seed(1)
    x, y = torch.rand(30, 3, 16, 16), torch.arange(3).repeat_interleave(10)
    passes = []
    inner = model.bottom_up
    model.bottom_up = lambda xb: passes.append(len(xb)) or inner(xb)
    model.fit_classifier(x, y, 0, 16)
    assert passes == [30]  # one batch, one pass (two before: the head's and the density's)
    M1Head.fit_classifier(twin, x, y, 0, 16)  # the head's own path: latent_posterior
    for name in ("feat_mean", "feat_std", "class_mu", "class_logvar"):
        assert torch.allclose(getattr(model, name), getattr(twin, name), atol=1e-5), name


def test_split_codes_refuses_codes_that_do_not_fill_groups():
    model = _ladder("hvae")
    with pytest.raises(ValueError, match="whole latent groups"):
        model._split_codes(torch.zeros(2, model.code_dim + 5))


@pytest.fixture(scope="module")
def hvae_run(tmp_path_factory, runner):
    from vae_cli.cli import app

    out = tmp_path_factory.mktemp("ppca")
    res = runner.invoke(app, ["train", "recipes/digits.yaml", "model.name=hvae", "model.latent_channels=4",
                              "model.width=16", "model.head_hidden=0", "train.epochs=2", "train.head_steps=0",
                              "--name", "h", "--out", str(out), "--json", "--quiet"])
    assert res.exit_code == 0, res.output
    return out / "h" / "model.safetensors"


def test_a_file_from_before_the_density_loads_and_samples(hvae_run, tmp_path, runner):
    """A weights file written before the PPCA buffers existed still loads, and `vae sample --class` answers
    from the class codes it knew; a file missing any other tensor is still refused as damaged."""
    from safetensors import safe_open

    from vae_cli.artifacts import checkpoint
    from vae_cli.cli import app

    with safe_open(str(hvae_run), "pt") as f:
        meta = f.metadata()
    state = load_file(str(hvae_run))
    assert {"code_mean", "code_basis", "code_noise"} <= set(state)
    old = tmp_path / "old.safetensors"
    save_file({k: v for k, v in state.items() if not k.startswith("code_")}, str(old), metadata=meta)
    model, _ = checkpoint.load(old)
    assert not model.has_code_density
    res = runner.invoke(app, ["sample", str(old), "-n", "4", "--class", "3", "-o", str(tmp_path / "s.png")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "s.png").stat().st_size > 0
    fresh, _ = checkpoint.load(hvae_run)
    assert fresh.has_code_density
    damaged = tmp_path / "damaged.safetensors"
    save_file({k: v for k, v in state.items() if k != "h0"}, str(damaged), metadata=meta)
    bad = runner.invoke(app, ["sample", str(damaged), "-n", "2", "-o", str(tmp_path / "d.png")])
    assert bad.exit_code != 0 and "h0" in bad.output and "Traceback" not in bad.output
    assert not (tmp_path / "d.png").exists()
