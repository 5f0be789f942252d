"""The optimisation loop: batches by slicing (or decoded ahead when a folder streams), autocast set up
once, AdamW with cosine decay, KL warm-up, gradient clipping; the resumable state every epoch (and every
`train.checkpoint_every` steps); SIGTERM/SIGINT write that state and stop; NaN/inf stops or skips.

A run killed at any point and resumed ends with the same weights as an uninterrupted run: the state file
holds the model, optimizer, scheduler, GradScaler, RNG states and the epoch's data order.
"""

from __future__ import annotations

import csv
import io
import math
import os
import signal
import time
import warnings
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from vae_cli.artifacts.rundir import RunDir
from vae_cli.core import fsutil
from vae_cli.core.console import Reporter
from vae_cli.core.errors import CheckpointError, Interrupted, RecipeError, UsageError, VaeError
from vae_cli.core.recipe import Recipe, from_dict
from vae_cli.core.runtime import Runtime, recheck_cpu_budget
from vae_cli.data import SPLIT_SEED, Dataset
from vae_cli.data.augment import augment, strong
from vae_cli.data.streaming import is_lazy
from vae_cli.engine import state
from vae_cli.engine.distributed import Dist
from vae_cli.engine.ema import EMA
from vae_cli.evaluation.evaluate import evaluate
from vae_cli.models.base import Batch

# Per-epoch numbers in metrics.csv use 2,000 test images only, so a 10,000-image test set does not
# dominate epoch time; the final evaluation uses the whole split.
EPOCH_EVAL = 2000
MAX_SKIPPED_IN_A_ROW = 50
# Test hook: make the loss NaN at this (1-based) global step, to exercise divergence handling for real.
INJECT_NAN_ENV = "VAE_INJECT_NAN_STEP"
# Test hook: a cheaper torch.compile backend (e.g. aot_eager) for tests of the compile plumbing.
COMPILE_BACKEND_ENV = "VAE_COMPILE_BACKEND"


class TrainingDiverged(VaeError):
    """The loss went NaN/inf; the message names the step."""


def _csv_text(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _lr_lambda(total_steps: Callable[[], int]):
    # Cosine decay to 5% of the base rate: stable late training without a tuned schedule. The length is read
    # at every step: a time budget (train.minutes) re-plans it after each epoch.
    def lr(step: int) -> float:
        total = total_steps()
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
    return lr


def plan_epochs(done: int, spent_s: float, last_epoch_s: float, budget_s: float, cap: int) -> int:
    """How many epochs a run with a time budget trains in all, planned after `done` epochs that took
    `spent_s` seconds, the last of them `last_epoch_s`: as many more as fit in what is left at the last
    epoch's pace, within [done, cap]. The last epoch, not the mean, because epochs grow slower as a run goes
    on (the consistency term's strong view runs on more images as more pseudo-labels pass): a plan from the
    mean would overrun, and re-planning every epoch absorbs what the last epoch's pace still misses."""
    more = math.floor(max(0.0, budget_s - spent_s) / max(last_epoch_s, 1e-9))
    return max(done, min(cap, done + more))


@contextmanager
def _signals_to_flag(flag: dict):
    """SIGTERM/SIGINT set flag['signum'] instead of killing the process; the loop checkpoints and stops."""
    def handler(signum, _frame):
        flag["signum"] = signum

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield flag
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextmanager
def _quiet_known_warnings():
    """Two warnings that are torch working as designed, silenced for the loop only (the filters are
    restored when it ends, so a program that calls `train()` keeps its own):
    - fp16: when the GradScaler skips an overflowing step, the scheduler "stepped without the optimizer";
    - DDP: a 1-channel first conv makes grads whose strides differ from the bucket view (harmless)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        yield


def _recipe_differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    diffs = []
    for k in sorted(set(a) | set(b)):
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            diffs += _recipe_differences(a[k], b[k], f"{prefix}{k}.")
        elif a.get(k) != b.get(k):
            diffs.append(f"{prefix}{k}")
    return diffs


def _with_defaults(saved: dict) -> dict:
    """An interrupted run's recipe with the keys added to the tool since it started at their defaults (each new
    key's default keeps the old behaviour), so an upgrade between the stop and --resume is no difference; a
    recipe this version cannot read at all is compared as it was saved."""
    try:
        return from_dict(saved).to_dict()
    except RecipeError:
        return saved


class Loop:
    """The optimisation loop and its resumable state."""

    def __init__(self, model, data: Dataset, recipe: Recipe, rt: Runtime, run: RunDir, reporter: Reporter,
                 d: Dist | None = None):
        self.model, self.data, self.recipe, self.rt = model, data, recipe, rt
        self.run_dir, self.reporter, self.d = run, reporter, d or Dist()
        self.on_epoch: Callable[[dict], None] | None = None  # rank 0: each epoch's row (the trackers)
        tc = recipe.train
        if tc.batch_size < self.d.world:
            raise UsageError(f"train.batch_size={tc.batch_size} is the global batch and must be at least the "
                             f"number of processes ({self.d.world})")
        # binarize=stochastic: batches are drawn from the grey images, a fresh Bernoulli sample each step
        self.stochastic = data.train_grey is not None
        self.x = (data.train_grey if self.stochastic else data.train_x).to(rt.device)
        self.y = data.train_y.to(rt.device)
        self.lab_idx = data.labelled.to(rt.device)
        self.labelled = torch.zeros(len(self.x), dtype=torch.bool, device=rt.device)
        self.labelled[self.lab_idx] = True
        self.bs = min(tc.batch_size, len(self.x))
        self.lbs = min(tc.labelled_batch_size, len(self.lab_idx))
        self.steps_per_epoch = math.ceil(len(self.x) / self.bs)
        self.planned = tc.epochs  # with a time budget (train.minutes), re-planned after each epoch
        self.total = self.planned * self.steps_per_epoch
        self.warmup = tc.kl_warmup_epochs * self.steps_per_epoch
        self.channels_last = tc.channels_last and self.x.ndim == 4
        if self.channels_last:  # oneDNN/cuDNN convolutions run faster on NHWC; the weights file is unaffected
            model.to(memory_format=torch.channels_last)
        # (after the layout change: DDP sizes its gradient buckets from the parameters as they are now)
        # DDP needs find_unused_parameters: the plain VAE's latent classifier is trained after the loop.
        self.net = (torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None,
            find_unused_parameters=True) if self.d.enabled else model)
        if tc.compile:  # weights are still saved from `model`, so files load into an uncompiled model
            self.net = torch.compile(self.net, backend=os.environ.get(COMPILE_BACKEND_ENV, "inductor"))
        self.opt, fused = _adamw(model, tc)
        if tc.fused_optimizer and not fused:
            self.reporter.log(f"note: no fused AdamW kernel for {rt.device.type} in torch {torch.__version__}; "
                              f"using the standard one (same maths, slower; train.fused_optimizer=false hides this)")
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, _lr_lambda(lambda: self.total))
        self.scaler = rt.grad_scaler()
        self.gen = torch.Generator().manual_seed(recipe.seed)
        self.progress = state.Progress()
        self.perm: torch.Tensor | None = None
        self.inject_nan = int(os.environ.get(INJECT_NAN_ENV, "0") or 0)
        self.skipped_in_a_row = 0
        self.ema = EMA(model, tc.ema) if tc.ema > 0 else None
        # the per-epoch test numbers: a fixed random subset (folder test sets are sorted by class, so the
        # first images would be one or two classes); the same images whatever the seed
        n_test = len(data.test_x)
        pick = torch.randperm(n_test, generator=torch.Generator().manual_seed(SPLIT_SEED))[:EPOCH_EVAL]
        self.epoch_eval = pick.sort().values if n_test > EPOCH_EVAL else torch.arange(n_test)

    def resume_from(self, path: Path) -> None:
        tensors, meta = state.load(path)
        if not isinstance(meta.get("recipe"), dict):
            raise CheckpointError(f"resume state '{path}' has no readable recipe; delete it to start the run over")
        diffs = _recipe_differences(_with_defaults(meta["recipe"]), self.recipe.to_dict())
        if diffs:
            raise UsageError(f"cannot resume '{path.parent}': the recipe differs from the interrupted run's in "
                             f"{', '.join(diffs)}; resume with the same recipe, or start a new run with --name")
        try:
            self.perm, self.progress = state.restore(tensors, meta, model=self.model, opt=self.opt,
                                                     sched=self.sched, scaler=self.scaler, gen=self.gen,
                                                     device=self.rt.device, rank=self.d.rank)
            if self.ema is not None:
                self.ema.load(tensors)
            self._set_plan(self.progress.planned_epochs or self.recipe.train.epochs)
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as e:  # a damaged or foreign state
            raise CheckpointError(f"resume state '{path}' is damaged ({type(e).__name__}: {str(e)[:120]}); delete "
                                  f"it to start the run over") from None

    def save_state(self) -> None:
        # every rank's own noise stream travels with the state (gathered: a collective, so all ranks call it)
        rng = [t.cpu() for t in self.d.gather(torch.get_rng_state().to(self.rt.device))]
        if self.d.is_main:
            state.save(self.run_dir.state, model=self.model, opt=self.opt, sched=self.sched, scaler=self.scaler,
                       gen=self.gen, perm=self.perm, progress=self.progress, recipe=self.recipe.to_dict(),
                       ema=self.ema.tensors() if self.ema is not None else None,
                       rank_rng=rng if self.d.enabled else None)

    def _strong(self, t: torch.Tensor) -> torch.Tensor:
        """The consistency term's strong view: the recipe's flips (train.augment_flip) plus larger shifts,
        rotations and cutout."""
        t = strong(t, flip=self.recipe.train.augment_flip)
        return t.contiguous(memory_format=torch.channels_last) if self.channels_last else t

    def _aug(self, t: torch.Tensor) -> torch.Tensor:
        tc = self.recipe.train
        t = augment(t, tc.augment_shift, tc.augment_rotate, tc.augment_flip, tc.augment_crop)
        t = torch.bernoulli(t) if self.stochastic else t
        return t.contiguous(memory_format=torch.channels_last) if self.channels_last else t

    def _step(self, idx: torch.Tensor, xb: torch.Tensor | None = None) -> dict[str, float] | None:
        """One optimisation step on this rank's indices `idx` (their images `xb` when the dataset streams
        and they were decoded ahead); None when a non-finite batch was skipped."""
        tc, p, dev = self.recipe.train, self.progress, self.rt.device
        if self.model.needs_labelled_batch:
            lab = self.lab_idx[torch.randint(len(self.lab_idx), (self.lbs,), generator=self.gen).to(dev)]
            lab = self.d.shard(lab)
            x_lab, y_lab = self._aug(self.x[lab].to(dev)), self.y[lab]
        else:
            x_lab, y_lab = self.x[:0].to(dev), self.y[:0]
        x = self.x[idx] if xb is None else xb.to(dev, non_blocking=True)
        batch = Batch(self._aug(x), self.y[idx], self.labelled[idx], x_lab, y_lab, strong=self._strong)
        kl_weight = min(1.0, (p.step + 1) / self.warmup) if self.warmup else 1.0
        with self.rt.autocast():
            # a tensor, not a float: torch.compile would recompile for every warm-up value
            terms = self.net(batch, torch.tensor(kl_weight, device=self.rt.device))
        loss = terms["loss"]
        if self.inject_nan == p.step + 1:
            loss = loss * float("nan")
        self.opt.zero_grad(set_to_none=True)
        bad = self.d.sum_(torch.tensor([float(not torch.isfinite(loss))], device=self.rt.device)).item() > 0
        if bad and self.d.enabled:  # DDP expects a backward after every forward; its grads are dropped
            torch.nan_to_num(loss, 0.0, 0.0, 0.0).mul(0).backward()
            self.opt.zero_grad(set_to_none=True)
        if bad:
            where = f"step {p.step + 1} (epoch {p.epoch})"
            if not tc.skip_nonfinite:
                raise TrainingDiverged(f"loss became {loss.item()} at {where}; the last good state is kept in "
                                       f"{self.run_dir.state}: lower train.lr (or set train.skip_nonfinite=true) "
                                       f"and rerun")
            self.skipped_in_a_row += 1
            self.reporter.log(f"warning: skipped a batch with loss {loss.item()} at {where}")
            if self.skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
                raise TrainingDiverged(f"{self.skipped_in_a_row} batches in a row had a non-finite loss up to "
                                       f"{where}; lower train.lr")
            return None
        self.skipped_in_a_row = 0
        self.scaler.scale(loss).backward()
        skipped = False
        if tc.grad_clip > 0 or tc.grad_skip > 0:
            self.scaler.unscale_(self.opt)
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip or float("inf"))
            skipped = self._skip_update(float(norm))
        if not skipped:
            self.scaler.step(self.opt)
        self.scaler.update()
        if self.ema is not None:
            self.ema.update(self.model, self.progress.step)
        extra = {"grad_skipped": float(skipped)} if tc.grad_skip > 0 else {}
        return {"kl_weight": kl_weight, **{k: v.item() for k, v in terms.items()}, **extra}

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

    def run(self) -> list[dict]:
        p = self.progress
        flag: dict = {}
        self.reporter.start(self.total)
        self.reporter.step(p.step)
        try:
            with _signals_to_flag(flag), _quiet_known_warnings():
                while p.epoch <= self.planned:
                    self._epoch(flag)
        finally:
            self.reporter.stop()
            if is_lazy(self.x):
                self.x.close()
        if self.ema is not None:  # what is evaluated, calibrated and saved from here on
            self.ema.copy_to(self.model)
        return p.rows

    def _set_plan(self, epochs: int) -> None:
        self.planned, self.progress.planned_epochs = epochs, epochs
        self.total = epochs * self.steps_per_epoch
        self.reporter.set_total(self.total)

    def _replan(self, train_s: float) -> None:
        """train.minutes: fit the schedule to the budget from the epochs' measured times (every rank takes the
        shortest plan, so all stop at the same epoch). Called after an epoch's steps, before its test-subset
        evaluation: with evaluations every N epochs (train.eval_every) an epoch's pace is its training plus 1/N
        of the last measured evaluation, and what a coming evaluation will cost is set aside (this epoch's, when
        it has one; and the last epoch's, which always has one)."""
        tc, p = self.recipe.train, self.progress
        p.spent_seconds += train_s
        if tc.minutes <= 0:
            return
        n, ev = tc.eval_every, p.eval_seconds
        owed = ev * (n - 1) / n + (ev if p.epoch % n == 0 else 0.0)
        pace = train_s + ev / n
        plan = plan_epochs(p.epoch, p.spent_seconds + owed, pace, tc.minutes * 60, tc.epochs)
        plan = -int(self.d.max_(torch.tensor([-plan], device=self.rt.device)).item())
        if plan != self.planned:
            self.reporter.log(f"time budget {tc.minutes:g} min: {p.spent_seconds / 60:.1f} min spent, {plan} epochs "
                              f"planned (was {self.planned}; an epoch's pace {pace:.0f}s: "
                              f"{train_s:.0f}s of steps + {ev / n:.0f}s of evaluation)")
        self._set_plan(plan)

    def _stop_if_signalled(self, flag: dict) -> None:
        signum = flag.get("signum", 0)
        if self.d.enabled:  # every rank stops at the same step, or the next collective would hang
            signum = int(self.d.max_(torch.tensor([signum], device=self.rt.device)).item())
        if signum:
            flag["signum"] = signum
            self.save_state()
            name = signal.Signals(flag["signum"]).name
            raise Interrupted(f"{name} received: stopped at step {self.progress.step}; resumable state in "
                              f"{self.run_dir.state} (continue with --resume)", flag["signum"])

    def _epoch(self, flag: dict) -> None:
        tc, p, rt = self.recipe.train, self.progress, self.rt
        if not p.order_drawn:
            self.perm = torch.randperm(len(self.x), generator=self.gen).to(rt.device)
            p.sums, p.epoch_seconds, p.order_drawn = {}, 0.0, True
        # training mode for every epoch: the evaluation at the end of the last one left the model in eval mode
        # (until this line existed, epochs 2+ ran without dropout and with batch-norm statistics frozen, and
        # a resumed run differed from an uninterrupted one for models that have either)
        self.model.train()
        t0 = time.perf_counter()
        steps = range(p.step_in_epoch, self.steps_per_epoch)
        shards = [self.d.shard(self.perm[i * self.bs:(i + 1) * self.bs]) for i in steps]
        # a streamed dataset: worker processes decode the coming batches while this one trains
        ahead = self.x.batches([s.cpu().numpy() for s in shards]) if is_lazy(self.x) else None
        for i, mine in zip(steps, shards):
            self._stop_if_signalled(flag)
            terms = self._step(mine, next(ahead) if ahead is not None else None)
            self.sched.step()
            if (budget := recheck_cpu_budget()) is not None:  # another vae job started or ended
                self.reporter.log(f"cpu: now {budget.describe()}")
            p.step += 1
            p.step_in_epoch = i + 1
            if terms is not None:
                for k, v in terms.items():  # this rank's share; the ranks' sums are added at the epoch's end
                    p.sums[k] = p.sums.get(k, 0.0) + v * len(mine)
                self.reporter.step(1, f"loss {terms['loss']:.2f}")
            if tc.checkpoint_every and p.step % tc.checkpoint_every == 0:
                p.epoch_seconds += time.perf_counter() - t0
                t0 = time.perf_counter()
                self.save_state()
        self._stop_if_signalled(flag)
        p.epoch_seconds += time.perf_counter() - t0
        self._replan(p.epoch_seconds)
        # train.eval_every: the test numbers every N epochs and on the last one (blank cells between)
        test = {}
        if p.epoch % tc.eval_every == 0 or p.epoch >= self.planned:
            t_eval = time.perf_counter()
            with self.ema.applied(self.model) if self.ema is not None else nullcontext():
                test = evaluate(self.model, self.data.test_x[self.epoch_eval], self.data.test_y[self.epoch_eval],
                                self.data.classes, rt, generative=False)
            p.eval_seconds = time.perf_counter() - t_eval
            p.spent_seconds += p.eval_seconds
        n = len(self.x)
        # models whose classifier is fitted after the loop (the VAE's M1 head) have no accuracy to report yet
        acc = round(test["accuracy"], 4) if test and self.model.needs_labelled_batch else ""
        keys = sorted(k for k in p.sums if k != "kl_weight")
        totals = self.d.sum_(torch.tensor([p.sums[k] for k in keys], dtype=torch.float64, device=rt.device)).tolist()
        row = {"epoch": p.epoch, "step": p.step,
               **{f"train_{k}": round(v / n, 5) for k, v in zip(keys, totals)},
               "kl_weight": round(min(1.0, p.step / self.warmup) if self.warmup else 1.0, 4),
               "lr": f"{self.sched.get_last_lr()[0]:.3g}", "test_elbo": round(test["elbo"], 4) if test else "",
               "test_accuracy": acc, "seconds": round(p.epoch_seconds, 3)}
        p.rows.append(row)
        shown = (f"  test elbo {row['test_elbo']:.3f}" if test else "") + (f"  acc {acc:.4f}" if acc != "" else "")
        self.reporter.log(f"epoch {p.epoch}/{self.planned}  loss {row.get('train_loss', float('nan')):.3f}"
                          f"{shown}  {row['seconds']:.1f}s")
        p.epoch, p.step_in_epoch, p.order_drawn = p.epoch + 1, 0, False
        if self.d.is_main:
            fsutil.write_text(self.run_dir.metrics, _csv_text(p.rows))
            if self.on_epoch is not None:
                self.on_epoch(row)
        self.save_state()


def _adamw(model, tc) -> tuple[torch.optim.Optimizer, bool]:
    """AdamW, with the fused kernel when asked for and this torch/device has one (same maths, fewer passes);
    and whether it is the fused one."""
    params = list(model.parameters())
    if tc.fused_optimizer:
        try:
            return torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay, fused=True), True
        except (RuntimeError, ValueError, TypeError):  # no fused kernel for this device or torch version
            pass
    return torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay), False
