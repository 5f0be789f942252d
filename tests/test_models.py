"""Every registered model: shapes, finite loss, backward, sampling, checkpoint round trip."""

from __future__ import annotations

import pytest
import torch

from vae_cli.artifacts import checkpoint
from vae_cli.core import rng
from vae_cli.core.recipe import ModelConfig
from vae_cli.core.recipe_rules import model_keys
from vae_cli.models import REGISTRY, build_model, losses
from vae_cli.models.base import Batch
from vae_cli.models.likelihoods import LIKELIHOODS
from vae_cli.models.nets import BACKBONES

SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32), (3, 30, 22)]


def _model(name, shape, k=10, **cfg):
    cfg = {"width": 8, **cfg}
    torch.manual_seed(0)
    return build_model(ModelConfig(name=name, latent_dim=4, hidden=32, head_hidden=16, **cfg), shape, k)


@pytest.mark.parametrize("name", sorted(REGISTRY))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("likelihood", LIKELIHOODS.names())
def test_shapes_loss_backward(name, shape, likelihood):
    model = _model(name, shape, likelihood=likelihood, rotation=1.0, colour_order=1.0)
    x = torch.rand(5, *shape)
    y = torch.randint(0, 10, (5,))
    terms = model.loss(Batch(x, y, torch.ones(5, dtype=torch.bool), x[:2], y[:2]), kl_weight=1.0)
    assert {"loss", "recon", "kl"} <= set(terms)
    assert all(t.ndim == 0 and torch.isfinite(t) for t in terms.values())
    terms["loss"].backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    model.eval()
    with torch.no_grad():
        assert model.predict_proba(x).shape == (5, 10)
        assert torch.allclose(model.predict_proba(x).sum(1), torch.ones(5), atol=1e-5)
        for out in (model.sample(3), model.sample(3, torch.tensor([0, 1, 2])), model.reconstruct(x)):
            assert out.shape[1:] == shape and out.min() >= 0 and out.max() <= 1
        parts = model.elbo_parts(x)
        assert parts["recon"].shape == (5,) and parts["kl"].shape == (5,)
        up = model.upright_logp(x)  # M2 on images has a rotation head; the others say they have none
        assert up is None or (up.shape == (5,) and (up <= 0).all())
        col = model.colour_logp(x)  # M2 on colour images has a colour-order head
        assert (col is None) == (not model.has_colour_head)
        assert col is None or (col.shape == (5,) and (col <= 0).all())
    if hasattr(model, "rotation_head"):
        assert torch.isfinite(terms["rotation"])
    assert model.has_colour_head == (name in ("m2", "m2h") and shape[0] == 3 and len(shape) == 3)
    if model.has_colour_head:
        assert torch.isfinite(terms["colour_order"])


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_test_flip_averages_the_mirror_image(name):
    x = torch.rand(6, 3, 16, 16)
    plain, flip = _model(name, (3, 16, 16)).eval(), _model(name, (3, 16, 16), test_flip=True).eval()
    with torch.no_grad():
        assert torch.equal(plain.class_probs(x), plain.predict_proba(x))
        want = (flip.predict_proba(x) + flip.predict_proba(x.flip(3))) / 2
        assert torch.allclose(flip.class_probs(x), want, atol=1e-6)
        assert torch.allclose(flip.class_probs(x).sum(1), torch.ones(6), atol=1e-5)
        assert not torch.allclose(flip.class_probs(x), flip.predict_proba(x), atol=1e-6)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_energy_is_the_logsumexp_of_the_class_logits(name):
    """The energy reject score (Liu et al. 2020) keeps the logits' scale the softmax drops; the softmax of
    the same logits is what every model predicts."""
    x = torch.rand(6, 3, 16, 16)
    plain, flip = _model(name, (3, 16, 16)).eval(), _model(name, (3, 16, 16), test_flip=True).eval()
    with torch.no_grad():
        logits = plain.predict_logits(x)
        assert torch.allclose(plain.energy(x), torch.logsumexp(logits, 1), atol=1e-6)
        assert torch.allclose(plain.predict_proba(x), torch.softmax(logits, 1), atol=1e-6)
        want = (torch.logsumexp(flip.predict_logits(x), 1) + torch.logsumexp(flip.predict_logits(x.flip(3)), 1)) / 2
        assert torch.allclose(flip.energy(x), want, atol=1e-6)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_ood_features_are_per_image_and_mirror_averaged(name):
    """What the knn reject score compares: one finite vector per image, the same for an image wherever it sits
    in the batch (eval mode), averaged with the mirror image's under test_flip."""
    x = torch.rand(6, 3, 16, 16)
    plain, flip = _model(name, (3, 16, 16)).eval(), _model(name, (3, 16, 16), test_flip=True).eval()
    with torch.no_grad():
        f = plain.ood_features(x)
        assert f.ndim == 2 and f.shape[0] == 6 and f.shape[1] > 0 and torch.isfinite(f).all()
        assert torch.allclose(plain.ood_features(x[3:]), f[3:], atol=1e-5)
        assert torch.allclose(flip.ood_features(x), (flip.features(x) + flip.features(x.flip(3))) / 2, atol=1e-6)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_bf16_autocast_loss_is_finite(name):
    model = _model(name, (1, 28, 28))
    x = torch.rand(4, 1, 28, 28)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = torch.zeros(4, dtype=torch.long)
        terms = model.loss(Batch(x, y, torch.ones(4, dtype=torch.bool), x[:2], y[:2]), 1.0)
    assert terms["loss"].dtype == torch.float32 and torch.isfinite(terms["loss"])


def test_gaussian_kl_matches_torch_distributions():
    mu, logvar = torch.randn(6, 5), torch.randn(6, 5)
    q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(torch.zeros(5), torch.ones(5))
    expected = torch.distributions.kl_divergence(q, p).sum(1)
    assert torch.allclose(losses.gaussian_kl(mu, logvar), expected, atol=1e-5)
    assert torch.allclose(losses.gaussian_kl(torch.zeros(2, 3), torch.zeros(2, 3)), torch.zeros(2))


def test_likelihoods_match_torch_distributions():
    logits, x = torch.randn(3, 1, 4, 4), torch.randint(0, 2, (3, 1, 4, 4)).float()
    expected = -torch.distributions.Bernoulli(logits=logits).log_prob(x).flatten(1).sum(1)
    assert torch.allclose(losses.bernoulli_nll(logits, x), expected, atol=1e-5)
    mean, log_scale = torch.rand(3, 1, 4, 4), torch.tensor([-1.3])
    expected = -torch.distributions.Normal(mean, log_scale.exp()).log_prob(x).flatten(1).sum(1)
    assert torch.allclose(losses.gaussian_nll(mean, log_scale, x), expected, atol=1e-4)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_checkpoint_round_trip_gives_identical_outputs(tmp_path, name):
    from vae_cli.core.recipe import Recipe

    wanted = {"latent_dim": 4, "width": 8, "hidden": 32, "rotation": 1.0, "test_flip": True}
    reads = set(model_keys(name))  # a recipe may set only what the model reads
    recipe = Recipe().replace(**{"model.name": name, **{f"model.{k}": v for k, v in wanted.items() if k in reads}})
    model = build_model(recipe.model, (1, 8, 8), 10).eval()
    with torch.no_grad():
        for b in model.buffers():  # buffers must travel too
            if b.is_floating_point():
                b.add_(0.25)
    path = tmp_path / "m.safetensors"
    checkpoint.save(path, model, classes=[str(i) for i in range(10)], preprocess={"channels": 1, "size": [8, 8]},
                    metrics={"accuracy": 0.5}, recipe=recipe.to_dict())
    loaded, meta = checkpoint.load(path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    model.to(memory_format=torch.channels_last)  # the layout load() gives conv weights (faster convolutions)
    x = torch.rand(7, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(model.predict_proba(x), loaded.predict_proba(x))
        assert torch.equal(model.reconstruct(x), loaded.reconstruct(x))
        assert torch.equal(model.class_probs(x), loaded.class_probs(x))
        assert torch.equal(model.energy(x), loaded.energy(x))
        up = model.upright_logp(x)
        assert (up is None and loaded.upright_logp(x) is None) or torch.equal(up, loaded.upright_logp(x))
    assert meta["model"] == name and meta["metrics"]["accuracy"] == 0.5
    assert not list(tmp_path.glob(".*.tmp")), "temporary file left behind"


def test_m2_unlabelled_bound_equals_the_explicit_sum_over_classes():
    """The batched enumeration gives, per image, sum_y q(y|x) * -L(x,y) - H(q) computed class by class."""
    from vae_cli.models.m2 import m2_unlabelled_bound

    model = _model("m2", (1, 8, 8)).eval()
    x = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        h = model.trunk(x)
        q = torch.softmax(model.class_logits(h), 1)
        torch.manual_seed(1)
        batched = m2_unlabelled_bound(q, model._enumerate(x, h)["value"])
        torch.manual_seed(1)
        # the same noise draws, one (image, class) pair at a time in the same order
        eps = torch.randn(3 * 10, 4)
        explicit = torch.zeros(3)
        for i in range(3):
            for c in range(10):
                y = torch.tensor([c])
                mu, logvar = model.posterior(h[i:i + 1], y)
                z = mu + eps[i * 10 + c] * torch.exp(0.5 * logvar)
                recon = model.likelihood.nll(model.decode(z, y), x[i:i + 1])
                value = recon + losses.gaussian_kl(mu, logvar) + torch.log(torch.tensor(10.0))
                explicit[i] += q[i, c] * value[0]
            explicit[i] += (q[i] * torch.log(q[i])).sum()  # minus the entropy
    assert torch.allclose(batched, explicit, atol=1e-4), (batched, explicit)


def test_m2_samples_follow_the_class():
    model = _model("m2", (1, 8, 8)).eval()
    with torch.no_grad():
        a = model.sample(2, torch.tensor([1, 1]), temperature=0.0)
        b = model.sample(2, torch.tensor([7, 7]), temperature=0.0)
    assert torch.allclose(a[0], a[1]) and not torch.allclose(a[0], b[0])


@pytest.mark.parametrize("name", sorted(REGISTRY))
@pytest.mark.parametrize("backbone", BACKBONES.names())
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 30, 22), (3, 16, 16), (3, 64, 64)],
                         ids=lambda s: "x".join(map(str, s)))
def test_every_backbone_round_trips_any_shape(name, backbone, shape):
    model = _model(name, shape, backbone=backbone)
    x = torch.rand(3, *shape)
    y = torch.randint(0, 10, (3,))
    terms = model.loss(Batch(x, y, torch.ones(3, dtype=torch.bool), x, y), kl_weight=0.5)
    terms["loss"].backward()
    assert torch.isfinite(terms["loss"])
    model.eval()
    with torch.no_grad():
        assert model.reconstruct(x).shape == x.shape and model.sample(2).shape == (2, *shape)


def test_deep_backbone_is_the_classic_stack():
    model = _model("vae", (1, 28, 28), backbone="deep", **{"width": 32})
    convs = [m for m in model.encoder.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 64, 128, 256, 512, 1024]
    assert all(c.kernel_size == (3, 3) and c.stride == (2, 2) for c in convs)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.encoder.modules()) == 6
    assert sum(isinstance(m, torch.nn.ConvTranspose2d) for m in model.decoder.modules()) == 6


@pytest.mark.parametrize("backbone", [n for n in BACKBONES.names() if BACKBONES.get(n).uses_width])
def test_model_width_sizes_every_conv_backbone(backbone):
    """model.width was once ignored by the deep stack: the first conv layer must have `width` channels."""
    for width in (8, 16):
        model = _model("vae", (1, 28, 28), backbone=backbone, **{"width": width})
        first = next(m for m in model.encoder.modules() if isinstance(m, torch.nn.Conv2d))
        assert first.out_channels == width and model.decoder.out.in_channels == width


def test_model_dropout_reaches_the_m1_head():
    """The VAE's M1 head once used a hard-coded 0.3 whatever model.dropout said."""
    for p in (0.0, 0.6):
        model = _model("vae", (1, 8, 8), dropout=p)
        assert [m.p for m in model.head.modules() if isinstance(m, rng.Dropout)] == [p]


@pytest.mark.parametrize("backbone", ["small", "deep", "resnet"])
def test_a_few_bf16_steps_stay_finite(backbone):
    """CPU bf16 kernels gave the deep stack non-finite gradients within two steps (its 1x1 maps); it runs
    in fp32 under autocast now. Real optimizer steps, as training takes them."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone=backbone, likelihood="gaussian"), (1, 28, 28), 10)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    x = torch.rand(32, 1, 28, 28)
    e = torch.zeros(0)
    for _ in range(4):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model.loss(Batch(x, e, e, e, e), 0.5)["loss"]
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        opt.step()


def test_iwae_bound_tightens_with_k_and_matches_the_vae_at_k1():
    """Burda et al. 2016: the k-sample bound is an ELBO at k=1 and rises with k (compared on the same weights)."""
    x = torch.bernoulli(torch.rand(16, 1, 8, 8))
    batch = Batch(x, torch.zeros(16, dtype=torch.long), torch.ones(16, dtype=torch.bool), x[:0], x[:0])

    def mean_loss(name, k):
        model = _model(name, (1, 8, 8), iw_samples=k)  # same seed: same weights for every k
        model.to_latent.bias.data[4:] = -3.0  # a narrow posterior, far from the prior: a loose ELBO
        torch.manual_seed(1)
        with torch.no_grad():
            return torch.stack([model.loss(batch, 1.0)["loss"] for _ in range(200)]).mean().item()

    vae, k1, k20 = mean_loss("vae", 1), mean_loss("iwae", 1), mean_loss("iwae", 20)
    assert k1 == pytest.approx(vae, rel=0.01)  # analytic KL vs sampled log-ratio: same expectation
    assert k20 < k1 - 0.05


@pytest.mark.parametrize("name", sorted(REGISTRY))
@pytest.mark.parametrize("likelihood", LIKELIHOODS.names())
def test_evaluation_interface(name, likelihood):
    """log_weights / latent_means / decode_latents: what eval, --reject, probes and pictures call."""
    from vae_cli.artifacts.pictures import class_samples, interpolation

    model = _model(name, (1, 8, 8), likelihood=likelihood).eval()
    x = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        log_w = model.log_weights(x, 7, levels=17)
        assert log_w.shape == (3, 7) and torch.isfinite(log_w).all()
        # K = 1 weights are single-sample ELBO estimates: on average near the ELBO (itself averaged over draws:
        # its z, and m2h's y, are drawn too)
        one = torch.stack([model.log_weights(x, 1)[:, 0] for _ in range(300)]).mean(0)
        elbo = torch.stack([-(p["recon"] + p["kl"]) for p in (model.elbo_parts(x) for _ in range(300))]).mean(0)
        assert torch.allclose(one, elbo, rtol=0.05, atol=1.0), (one, elbo)
        z = model.latent_means(x)
        assert z.shape == (3, model.latent_size)
        assert model.decode_latents(z).shape == (3, 1, 8, 8)
        row = interpolation(model, x[:2], x[1:], steps=5)
        assert row.shape == (2 * 7, 1, 8, 8) and torch.equal(row[0], x[0]) and torch.equal(row[6], x[1])
        assert class_samples(model, 2).shape == (20, 1, 8, 8)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_the_evaluated_bound_does_not_depend_on_beta(name):
    """`model.beta` weights the KL in training (a beta-VAE); the ELBO that eval, bits/dim and report.html show is
    the bound itself, the same for any beta at the same weights and draws (m2's was weighted until session 22)."""
    x = torch.rand(3, 1, 8, 8)
    parts = []
    for beta in (1.0, 0.25):
        model = _model(name, (1, 8, 8), beta=beta).eval()
        torch.manual_seed(1)
        with torch.no_grad():
            parts.append(model.elbo_parts(x))
    assert torch.allclose(parts[0]["kl"], parts[1]["kl"]) and torch.allclose(parts[0]["recon"], parts[1]["recon"])
    assert (parts[0]["kl"] > 0.01).all()  # a KL that beta would have changed


# --- the value of each likelihood, against an independent reference (the shape tests above would pass with wrong
# maths) ----------------------------------------------------------------------------------------------------------
def _reference_nll(name: str, lik, out: torch.Tensor, x: torch.Tensor, levels: int | None) -> torch.Tensor:
    """-log p(x) per image, computed in float64 with torch.distributions or by the definition."""
    from torch import distributions as D

    out, x = out.double(), x.double()
    if name == "bernoulli":
        return -D.Bernoulli(logits=out).log_prob(x).flatten(1).sum(1)
    if name == "gaussian":
        mean, scale = torch.sigmoid(out), lik.log_scale.double().clamp(-7, 2).exp()
        if levels is None:
            return -D.Normal(mean, scale).log_prob(x).flatten(1).sum(1)
        cdf, half = D.Normal(mean, scale).cdf, 0.5 / (levels - 1)
        upper = torch.where(x >= 1 - half, torch.ones_like(x), cdf(x + half))
        lower = torch.where(x <= half, torch.zeros_like(x), cdf(x - half))
        return -torch.log(upper - lower).flatten(1).sum(1)
    if name == "logistic":
        mean, scale = torch.sigmoid(out), lik.log_scale.double().clamp(-7, 2).exp()
        levels = levels or lik.LEVELS
        half = 0.5 / (levels - 1)
        cdf = lambda v: torch.sigmoid((v - mean) / scale)  # noqa: E731  (a logistic's CDF)
        upper = torch.where(x >= 1 - half, torch.ones_like(x), cdf(x + half))
        lower = torch.where(x <= half, torch.zeros_like(x), cdf(x - half))
        return -torch.log(upper - lower).flatten(1).sum(1)
    raise AssertionError(f"no reference for {name}")


# the mixture has its own float64 reference in tests/test_hvae.py
@pytest.mark.parametrize("name", [n for n in LIKELIHOODS.names() if n != "logistic_mixture"])
@pytest.mark.parametrize("levels", [None, 256])
def test_each_likelihood_value_matches_a_reference(name, levels):
    from vae_cli.core.recipe import ModelConfig

    torch.manual_seed(0)
    lik = LIKELIHOODS.get(name).for_image(3, ModelConfig(likelihood=name, mixtures=2))
    with torch.no_grad():
        if hasattr(lik, "log_scale"):
            lik.log_scale.fill_(-1.5)
    out = torch.randn(4, LIKELIHOODS.get(name).out_channels(3, ModelConfig(mixtures=2)), 5, 5)
    x = torch.randint(0, 256, (4, 3, 5, 5)).double() / 255
    if name == "bernoulli":
        x = (x > 0.5).double()
    ref = _reference_nll(name, lik, out, x, levels)
    got = lik.nll(out, x.float(), levels) if levels else lik.nll(out, x.float())
    assert torch.allclose(got.double(), ref, rtol=1e-4, atol=1e-3), (got, ref)
