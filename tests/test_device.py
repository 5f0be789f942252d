"""The suite's device tests: every model's training step under autocast, trainings in bf16 and fp16
(GradScaler) through the CLI, and the weights they write loading on the CPU. They run on the device named by
`VAE_TEST_DEVICE` (`scripts/device_check.sh` sets it: cuda on the GPU machine, cpu for its CPU half), else on
a CUDA GPU when one is visible; without either they skip (a CPU-only machine has no CUDA path to test)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from vae_cli.cli import app
from vae_cli.core.recipe import ModelConfig
from vae_cli.models import REGISTRY, build_model
from vae_cli.models.base import Batch

from .conftest import TINY

DEVICE = os.environ.get("VAE_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "")
pytestmark = pytest.mark.skipif(not DEVICE, reason="no CUDA GPU (set VAE_TEST_DEVICE=cpu to run these on the CPU)")
PRECISIONS = ["bf16", "fp16"] if DEVICE == "cuda" else ["fp32", "bf16"]


@pytest.mark.parametrize("name", sorted(REGISTRY))
@pytest.mark.parametrize("precision", PRECISIONS)
def test_every_model_trains_a_step_on_the_device(name, precision):
    dev = torch.device(DEVICE)
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name, latent_dim=4, hidden=32, head_hidden=16), (3, 16, 16), 4).to(dev)
    x = torch.rand(6, 3, 16, 16, device=dev)
    y = torch.randint(0, 4, (6,), device=dev)
    scaler = torch.amp.GradScaler(dev.type, enabled=precision == "fp16")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
        terms = model.loss(Batch(x, y, torch.ones(6, dtype=torch.bool, device=dev), x[:2], y[:2]), 1.0)
    assert all(torch.isfinite(t) for t in terms.values()), terms
    scaler.scale(terms["loss"]).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(g.device.type == dev.type for g in grads)
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model.sample(4)).all()


@pytest.mark.parametrize("precision", PRECISIONS)
def test_training_on_the_device_writes_weights_the_cpu_loads(tmp_path, runner, precision):
    from vae_cli.api import load

    res = runner.invoke(app, ["train", str(TINY), "--out", str(tmp_path), "--device", DEVICE, "--precision",
                              precision, "--json", "--quiet", "epochs=2"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["device"] == DEVICE and out["precision"] == precision
    model = load(out["paths"]["weights"], "cpu", "fp32")
    probs = model.predict_proba(torch.rand(3, *model.image_shape))
    assert torch.allclose(probs.sum(1), torch.ones(3), atol=1e-5)
