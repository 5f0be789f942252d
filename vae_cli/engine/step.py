"""One optimisation step of the `Loop` (engine/loop.py): the step's inputs and their augmentation, the model's
loss terms under autocast, the backward (in one pass, or in shards on worker threads: engine/shards.py),
non-finite losses stopped or skipped, gradient clipping or skipping, the optimizer and EMA updates.

`Steps` is the step half of `Loop`: it holds no state of its own and reads the attributes declared below,
which `Loop.__init__` sets.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch

from vae_cli.artifacts.rundir import RunDir
from vae_cli.core import cpu, rng
from vae_cli.core.console import Reporter
from vae_cli.core.errors import VaeError
from vae_cli.core.recipe import Recipe
from vae_cli.core.runtime import Runtime, granted_cores
from vae_cli.data.augment import augment, strong
from vae_cli.engine import state
from vae_cli.engine.distributed import Dist
from vae_cli.engine.ema import EMA
from vae_cli.engine.shards import Shards, auto_count, split
from vae_cli.models.base import Batch

MAX_SKIPPED_IN_A_ROW = 50
# Test hook: make the loss NaN at this (1-based) global step, to exercise divergence handling for real.
INJECT_NAN_ENV = "VAE_INJECT_NAN_STEP"


class TrainingDiverged(VaeError):
    """The loss went NaN/inf; the message names the step."""


class Steps:
    """The step methods of `Loop`."""

    model: torch.nn.Module
    net: torch.nn.Module  # the model, or its DDP / torch.compile wrapper
    recipe: Recipe
    rt: Runtime
    d: Dist
    run_dir: RunDir
    reporter: Reporter
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    ema: EMA | None
    shards: Shards | None
    progress: state.Progress
    gen: torch.Generator  # the data order's and the labelled draws' generator
    x: torch.Tensor
    y: torch.Tensor
    labelled: torch.Tensor
    lab_idx: torch.Tensor
    bs: int
    lbs: int
    warmup: int
    stochastic: bool
    channels_last: bool
    inject_nan: int
    skipped_in_a_row: int

    def _strong(self, t: torch.Tensor) -> torch.Tensor:
        """The consistency term's strong view: the recipe's flips (train.augment_flip) plus larger shifts,
        rotations and cutout."""
        t = strong(t, flip=self.recipe.train.augment_flip)
        return t.contiguous(memory_format=torch.channels_last) if self.channels_last else t

    def _aug(self, t: torch.Tensor) -> torch.Tensor:
        tc = self.recipe.train
        t = augment(t, tc.augment_shift, tc.augment_rotate, tc.augment_flip, tc.augment_crop)
        t = rng.bernoulli(t) if self.stochastic else t
        return t.contiguous(memory_format=torch.channels_last) if self.channels_last else t

    def _shard_count(self) -> int:
        """Shards per step (engine/shards.py): on the CPU without DDP or torch.compile, `train.shards` or one per
        core of the machine (the cores before sharing with other jobs); 0 (one plain pass) elsewhere."""
        tc = self.recipe.train
        if self.rt.device.type != "cpu" or self.d.enabled or tc.compile:
            return 0
        n = tc.shards or auto_count(cpu.detect(place=(0, 1)).cores, self.bs, math.prod(self.x.shape[1:]))
        return max(1, min(n, self.bs, self.lbs if self.model.needs_labelled_batch else n))

    def _set_shards(self, n: int) -> None:
        if self.shards is not None and self.shards.n == n:
            return
        if self.shards is not None:
            self.shards.close()
        self.shards = Shards(self.model, n, self.recipe.seed) if n else None
        self.progress.shards = n
        if n and self.scaler.is_enabled():  # the scale tensor is made on first use: here, not racing in the shards
            self.scaler.scale(torch.zeros((), device=self.rt.device))

    def _inputs(self, idx: torch.Tensor, xb: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """(x, y, labelled, x_lab, y_lab) of a step, not yet augmented: this rank's images `idx` (or `xb`, when
        the dataset streams and they were decoded ahead) and a draw from the labelled subset."""
        dev = self.rt.device
        if self.model.needs_labelled_batch:
            lab = self.lab_idx[torch.randint(len(self.lab_idx), (self.lbs,), generator=self.gen).to(dev)]
            lab = self.d.shard(lab)
            x_lab, y_lab = self.x[lab].to(dev), self.y[lab]
        else:
            x_lab, y_lab = self.x[:0].to(dev), self.y[:0]
        x = self.x[idx] if xb is None else xb.to(dev, non_blocking=True)
        return x, self.y[idx], self.labelled[idx], x_lab, y_lab

    def _terms(self, net, x, y, labelled, x_lab, y_lab, kl_weight: float, share: float = 1.0) -> dict:
        """The model's loss terms on one batch (or shard), augmented here (with this thread's generator)."""
        batch = Batch(self._aug(x), y, labelled, self._aug(x_lab) if len(x_lab) else x_lab, y_lab,
                      strong=self._strong, share=share)
        with self.rt.autocast(cache=self.shards is None):  # shards run side by side: core/runtime.py says why
            # a tensor, not a float: torch.compile would recompile for every warm-up value
            terms = net(batch, torch.tensor(kl_weight, device=self.rt.device))
        if self.inject_nan == self.progress.step + 1:
            terms["loss"] = terms["loss"] * float("nan")
        return terms

    def _step(self, idx: torch.Tensor, xb: torch.Tensor | None = None) -> dict[str, float] | None:
        """One optimisation step on this rank's indices `idx`; None when a non-finite batch was skipped."""
        p = self.progress
        kl_weight = min(1.0, (p.step + 1) / self.warmup) if self.warmup else 1.0
        inputs = self._inputs(idx, xb)
        if self.shards is not None:
            terms, bad = self._sharded_pass(inputs, kl_weight)
        else:
            terms = self._terms(self.net, *inputs, kl_weight)
            self.opt.zero_grad(set_to_none=True)
            loss = terms["loss"]
            bad = self.d.sum_(torch.tensor([float(not torch.isfinite(loss))], device=self.rt.device)).item() > 0
            if bad and self.d.enabled:  # DDP expects a backward after every forward; its grads are dropped
                torch.nan_to_num(loss, 0.0, 0.0, 0.0).mul(0).backward()
                self.opt.zero_grad(set_to_none=True)
            if not bad:
                self.scaler.scale(loss).backward()
        if bad:
            return self._skip_nonfinite(float(terms["loss"]))
        self.skipped_in_a_row = 0
        skipped = self._update()
        extra = {"grad_skipped": float(skipped)} if self.recipe.train.grad_skip > 0 else {}
        return {"kl_weight": kl_weight, **{k: float(v.detach()) for k, v in terms.items()}, **extra}

    def _sharded_pass(self, inputs: tuple[torch.Tensor, ...], kl_weight: float) -> tuple[dict, bool]:
        """Forward and backward of every shard (engine/shards.py); the gradients' mean in the model. Returns
        the terms averaged over the shards and whether any shard's loss was non-finite."""
        n = self.shards.n
        parts = list(zip(*(split(t, n) for t in inputs)))

        def shard(net, part):
            terms = self._terms(net, *part, kl_weight, share=1.0 / n)
            finite = bool(torch.isfinite(terms["loss"]))
            if finite:
                self.scaler.scale(terms["loss"]).backward()
            return {k: v.detach().float() for k, v in terms.items()}, finite

        results = self.shards.run(self.progress.step, shard, parts, granted_cores())
        terms = {k: sum(r[0][k] for r in results) / n for k in results[0][0] if all(k in r[0] for r in results)}
        bad = not all(r[1] for r in results)
        if bad:
            self.opt.zero_grad(set_to_none=True)
        else:
            self.shards.reduce()
        return terms, bad

    def _skip_nonfinite(self, loss: float) -> None:
        """A non-finite loss: stop with the last good state kept, or (train.skip_nonfinite) skip the batch."""
        p = self.progress
        where = f"step {p.step + 1} (epoch {p.epoch})"
        if not self.recipe.train.skip_nonfinite:
            raise TrainingDiverged(f"loss became {loss} at {where}; the last good state is kept in "
                                   f"{self.run_dir.state}: lower train.lr (or set train.skip_nonfinite=true) and rerun")
        self.skipped_in_a_row += 1
        self.reporter.log(f"warning: skipped a batch with loss {loss} at {where}")
        if self.skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
            raise TrainingDiverged(f"{self.skipped_in_a_row} batches in a row had a non-finite loss up to {where}; "
                                   f"lower train.lr")
        return None

    def _update(self) -> bool:
        """Clip (or skip: train.grad_skip), step the optimizer and the EMA; whether the update was skipped. The
        gradient norm is a reduction: with shards it runs on a one-thread worker, so it is the same on any cores."""
        tc = self.recipe.train
        skipped = False
        if tc.grad_clip > 0 or tc.grad_skip > 0:
            self.scaler.unscale_(self.opt)

            def clip() -> float:
                return float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip or float("inf")))
            skipped = self._skip_update(self.shards.call(clip) if self.shards is not None else clip())
        if not skipped:
            self.scaler.step(self.opt)
        self.scaler.update()
        if self.ema is not None:
            self.ema.update(self.model, self.progress.step)
        return skipped

    def _skip_update(self, norm: float) -> bool:
        """train.grad_skip: whether this update's gradient norm is more than grad_skip times the moving average
        of the accepted ones (after 50 steps of history). VDVAE (Child 2021, section 5) skips updates whose norm
        passes a fixed threshold: the rare huge KL gradients of a deep hierarchy otherwise undo hours of
        training; a non-finite norm is skipped too. Off (0), nothing is skipped here. A multiple of the running
        norm needs no tuning to the loss's scale (nats per image grow with the image). The average travels in
        the resumable state, so a resumed run skips the same steps."""
        p, tc = self.progress, self.recipe.train
        if tc.grad_skip <= 0:
            return False
        if not math.isfinite(norm) or (p.step >= 50 and norm > tc.grad_skip * p.grad_norm_avg):
            return True
        p.grad_norm_avg = norm if p.grad_norm_avg == 0 else 0.99 * p.grad_norm_avg + 0.01 * norm
        return False

    @contextmanager
    def _light_main_thread(self):
        """With shards, the main thread only hands them out (and steps the optimizer, elementwise): on one
        thread, so its idle OpenMP workers do not spin on the cores the shards' threads compute on (the digits
        with one shard: 4,489 -> 4,673 images/s, two shards 3,601 -> 4,597; BENCHMARKS.md session 16). The
        evaluation after the steps gets the cores back."""
        if self.shards is None:
            yield
            return
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(granted_cores())
