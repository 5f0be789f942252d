"""An exponential moving average of the weights (Polyak & Juditsky 1992), used for the per-epoch
evaluation and as the saved model when `train.ema` > 0: the averaged weights classify better than the last
step's when the learning rate is still high, as in Mean Teacher (Tarvainen & Valpola 2017) and FixMatch's
evaluation. Batch-norm statistics are averaged with the weights. The average travels in the resumable
state, so a resumed run ends with the same averaged weights.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Fold in the weights after optimisation step `step` (0-based). The decay warms up as TensorFlow's
        ExponentialMovingAverage with num_updates does, so the random initial weights fade in short runs;
        it depends on the step alone, so a resumed run averages exactly as an uninterrupted one."""
        rate = min(self.decay, (1 + step) / (10 + step))
        floats, targets = [], []
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                floats.append(self.shadow[k])
                targets.append(v.detach())
            else:  # counters (num_batches_tracked) follow the model
                self.shadow[k].copy_(v)
        torch._foreach_lerp_(floats, targets, 1.0 - rate)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        model.load_state_dict(self.shadow)

    @contextmanager
    def applied(self, model: nn.Module) -> Iterator[None]:
        """The averaged weights in `model` for the block (evaluation), the trained ones back after it."""
        saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.copy_to(model)
        try:
            yield
        finally:
            model.load_state_dict(saved)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"ema.{k}": v.detach().cpu().contiguous().clone() for k, v in self.shadow.items()}

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        for k, v in self.shadow.items():
            v.copy_(tensors[f"ema.{k}"])
