"""Training images/s of one model configuration on random 32x32 colour batches, for sizing the hierarchical VAE
to a CPU: `python scripts/hvae_speed.py [key=value ...]` (defaults: hvae, logistic_mixture; env P=fp32|bf16,
B=batch size). Five timed steps after two warm-up steps, AdamW, channels-last, as the training loop runs them."""

from __future__ import annotations

import os
import sys
import time

import torch

from vae_cli.core.recipe import load
from vae_cli.models import build_model
from vae_cli.models.base import Batch


def main() -> None:
    overrides = sys.argv[1:]
    precision, b = os.environ.get("P", "bf16"), int(os.environ.get("B", "128"))
    recipe = load(None, ["model.name=hvae", "model.likelihood=logistic_mixture", *overrides])
    model = build_model(recipe.model, (3, 32, 32), 10).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), 1e-3, fused=True)
    x = (torch.rand(b, 3, 32, 32) * 255).round().div(255).contiguous(memory_format=torch.channels_last)
    batch = Batch(x, torch.zeros(b, dtype=torch.long), torch.zeros(b, dtype=torch.bool), x[:0], x[:0])
    for i in range(7):
        if i == 2:
            t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model.loss(batch, 1.0)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    per_step = (time.perf_counter() - t0) / 5
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"{' '.join(overrides) or '(defaults)'} {precision} batch {b}: {params:.2f}M parameters, "
          f"{b / per_step:.0f} training images/s")


if __name__ == "__main__":
    main()
