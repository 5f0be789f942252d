"""Evaluation numbers: ELBO and its terms, accuracy, per-class accuracy, confusion matrix."""

from __future__ import annotations

import torch
from torch import Tensor

from vae_cli.runtime import Runtime


@torch.no_grad()
def predict(model, x: Tensor, runtime: Runtime, batch_size: int = 512) -> Tensor:
    """Class probabilities for x (moved to the model's device batch by batch)."""
    model.eval()
    out = []
    for xb in x.split(batch_size):
        with runtime.autocast():
            out.append(model.predict_proba(xb.to(runtime.device, non_blocking=True)).float().cpu())
    return torch.cat(out) if out else torch.empty(0, model.num_classes)


def confusion_matrix(y_true: Tensor, y_pred: Tensor, k: int) -> Tensor:
    """(k, k) counts; rows are true classes, columns predictions."""
    return torch.bincount(y_true * k + y_pred, minlength=k * k).view(k, k)


@torch.no_grad()
def evaluate(model, x: Tensor, y: Tensor, classes: list[str], runtime: Runtime,
             batch_size: int = 512, seed: int = 0) -> dict:
    """All numbers for one split; the ELBO's single z draw is seeded so reruns agree."""
    model.eval()
    recon, kl, probs = [], [], []
    devices = [runtime.device] if runtime.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for xb in x.split(batch_size):  # one pass: each batch moves to the device once
            xb = xb.to(runtime.device, non_blocking=True)
            with runtime.autocast():
                parts = model.elbo_parts(xb)
                probs.append(model.predict_proba(xb).float().cpu())
            recon.append(parts["recon"].float().cpu())
            kl.append(parts["kl"].float().cpu())
    recon_t, kl_t = torch.cat(recon), torch.cat(kl)
    pred = torch.cat(probs).argmax(1) if probs else torch.empty(0, dtype=torch.long)
    k = len(classes)
    cm = confusion_matrix(y.cpu(), pred, k)
    per_class = (cm.diag().float() / cm.sum(1).clamp_min(1).float()).tolist()
    nelbo = (recon_t + kl_t).mean().item()
    return {
        "n": len(x),
        "elbo": -nelbo,
        "recon": recon_t.mean().item(),
        "kl": kl_t.mean().item(),
        "accuracy": (pred == y.cpu()).float().mean().item(),
        "per_class_accuracy": dict(zip(classes, per_class)),
        "confusion_matrix": cm.tolist(),
    }
