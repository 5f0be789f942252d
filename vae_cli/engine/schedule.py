"""The training schedule's pure parts: the learning rate per step, the epochs a time budget fits, the
optimizer. No state here: `engine/loop.py` holds it."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def lr_lambda(total_steps: Callable[[], int], warm_steps: int = 0):
    # Cosine decay to 5% of the base rate: stable late training without a tuned schedule. The length is read
    # at every step: a time budget (train.minutes) re-plans it after each epoch. A run started from another
    # model's weights (train.init) first warms up linearly over `warm_steps`: the full rate on a trained model's
    # weights, with fresh Adam moments, would undo part of what it knows in the first steps.
    def lr(step: int) -> float:
        total = total_steps()
        cosine = 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
        return cosine * min(1.0, (step + 1) / warm_steps) if warm_steps else cosine
    return lr


def plan_epochs(done: int, spent_s: float, last_epoch_s: float, budget_s: float, cap: int) -> int:
    """How many epochs a run with a time budget trains in all, planned after `done` epochs that took
    `spent_s` seconds, the last of them `last_epoch_s`: as many more as fit in what is left at the last
    epoch's pace, within [done, cap]. The last epoch, not the mean, because epochs grow slower as a run goes
    on (the consistency term's strong view runs on more images as more pseudo-labels pass): a plan from the
    mean would overrun, and re-planning every epoch absorbs what the last epoch's pace still misses."""
    more = math.floor(max(0.0, budget_s - spent_s) / max(last_epoch_s, 1e-9))
    return max(done, min(cap, done + more))


def adamw(model, tc) -> tuple[torch.optim.Optimizer, bool]:
    """AdamW, with the fused kernel when asked for and this torch/device has one (same maths, fewer passes);
    and whether it is the fused one."""
    params = list(model.parameters())
    if tc.fused_optimizer:
        try:
            return torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay, fused=True), True
        except (RuntimeError, ValueError, TypeError):  # no fused kernel for this device or torch version
            pass
    return torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay), False
