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
from vae_cli.core import cpu, fsutil, rng
from vae_cli.core.console import Reporter
from vae_cli.core.errors import CheckpointError, Interrupted, UsageError, VaeError
from vae_cli.core.recipe import Recipe
from vae_cli.core.runtime import Runtime, granted_cores, recheck_cpu_budget
from vae_cli.data import SPLIT_SEED, Dataset
from vae_cli.data.augment import augment, strong
from vae_cli.data.streaming import is_lazy
from vae_cli.engine import state
from vae_cli.engine.distributed import Dist
from vae_cli.engine.ema import EMA
from vae_cli.engine.schedule import adamw, lr_lambda, plan_epochs
from vae_cli.engine.shards import Shards, auto_count, split
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
        self.opt, fused = adamw(model, tc)
        if tc.fused_optimizer and not fused:
            self.reporter.log(f"note: no fused AdamW kernel for {rt.device.type} in torch {torch.__version__}; "
                              f"using the standard one (same maths, slower; train.fused_optimizer=false hides this)")
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lr_lambda(lambda: self.total, self.steps_per_epoch if tc.init else 0))
        self.scaler = rt.grad_scaler()
        self.gen = torch.Generator().manual_seed(recipe.seed)
        self.progress = state.Progress()
        self.perm: torch.Tensor | None = None
        self.inject_nan = int(os.environ.get(INJECT_NAN_ENV, "0") or 0)
        self.skipped_in_a_row = 0
        self.ema = EMA(model, tc.ema) if tc.ema > 0 else None
        self.shards: Shards | None = None
        self._set_shards(self._shard_count())
        # the per-epoch test numbers: a fixed random subset (folder test sets are sorted by class, so the
        # first images would be one or two classes); the same images whatever the seed
        n_test = len(data.test_x)
        pick = torch.randperm(n_test, generator=torch.Generator().manual_seed(SPLIT_SEED))[:EPOCH_EVAL]
        self.epoch_eval = pick.sort().values if n_test > EPOCH_EVAL else torch.arange(n_test)

    def started_warm(self, warm: bool) -> None:
        """The run's weights came from `train.init` (engine/warmstart.py); with its generative part loaded
        (`warm`) the KL term is on at full weight from the first step. Kept in the state for --resume."""
        self.progress.init_warm = warm
        self._set_kl_warmup()

    def _set_kl_warmup(self) -> None:
        tc = self.recipe.train
        self.warmup = 0 if self.progress.init_warm else tc.kl_warmup_epochs * self.steps_per_epoch

    def resume_from(self, path: Path) -> None:
        tensors, meta = state.load(path)
        if not isinstance(meta.get("recipe"), dict):
            raise CheckpointError(f"resume state '{path}' has no readable recipe; delete it to start the run over")
        diffs = state.recipe_differences(meta["recipe"], self.recipe.to_dict())
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
            self._set_shards(self.progress.shards)  # the interrupted run's count, whatever this machine has
            self._set_kl_warmup()
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
        t = rng.bernoulli(t) if self.stochastic else t
        return t.contiguous(memory_format=torch.channels_last) if self.channels_last else t

    def _shard_count(self) -> int:
        """Shards per step (engine/shards.py): on the CPU without DDP or torch.compile, `train.shards` or one per
        core of the machine (the cores before sharing with other jobs); 0 (one plain pass) elsewhere."""
        tc = self.recipe.train
        if self.rt.device.type != "cpu" or self.d.enabled or tc.compile:
            return 0
        if not tc.shards and self._colour_strong_view():
            return 0  # not yet: see _colour_strong_view
        n = tc.shards or auto_count(cpu.detect(place=(0, 1)).cores, self.bs, math.prod(self.x.shape[1:]))
        return max(1, min(n, self.bs, self.lbs if self.model.needs_labelled_batch else n))

    def _colour_strong_view(self) -> bool:
        """Whether the step runs the consistency term's kornia view of colour images. Shards of such a step run
        side by side gave different gradients from run to run (the same losses: the backward differs; cause not
        found yet, BENCHMARKS.md session 16), one after another the same bits. So `train.shards: 0` keeps these
        runs on one multi-threaded pass (as fast as before, but their weights follow the cores they get), and
        an explicit `train.shards` runs the shards one after another (the same weights on any cores, on one)."""
        return (self.recipe.model.consistency > 0 and "consistency" in self.model.reads
                and self.x.ndim == 4 and self.x.shape[1] == 3)

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
        with self.rt.autocast():
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
        return {"kl_weight": kl_weight, **{k: float(v) for k, v in terms.items()}, **extra}

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

        side_by_side = granted_cores() if not self._colour_strong_view() else 1
        results = self.shards.run(self.progress.step, shard, parts, side_by_side)
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
            if self.shards is not None:
                self.shards.close()
            if is_lazy(self.x):
                self.x.close()
        return p.rows

    def use_average(self) -> None:
        """train.ema: the moving average of the weights becomes the model's own, which is what finish()
        evaluates, calibrates and saves (without EMA the model's weights are already the result)."""
        if self.ema is not None:
            self.ema.copy_to(self.model)

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
        """One epoch, as it reads: its order, its steps, the re-plan, the test numbers, the metrics row, the
        state."""
        p = self.progress
        self._begin_epoch()
        self._train_steps(flag)
        self._replan(p.epoch_seconds)
        test = self._epoch_test()
        row = self._epoch_row(test)
        p.epoch, p.step_in_epoch, p.order_drawn = p.epoch + 1, 0, False
        if self.d.is_main:
            fsutil.write_text(self.run_dir.metrics, _csv_text(p.rows))
            if self.on_epoch is not None:
                self.on_epoch(row)
        self.save_state()

    def _begin_epoch(self) -> None:
        p = self.progress
        if not p.order_drawn:
            self.perm = torch.randperm(len(self.x), generator=self.gen).to(self.rt.device)
            p.sums, p.epoch_seconds, p.order_drawn = {}, 0.0, True
        # training mode for every epoch: the evaluation at the end of the last one left the model in eval mode
        # (until this line existed, epochs 2+ ran without dropout and with batch-norm statistics frozen, and
        # a resumed run differed from an uninterrupted one for models that have either)
        self.model.train()

    def _train_steps(self, flag: dict) -> None:
        """The epoch's remaining steps, with the checkpoint cadence (train.checkpoint_every) and a look at the
        CPU budget between steps; this rank's loss sums in `progress.sums`."""
        with self._light_main_thread():
            self._train_steps_in(flag)

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

    def _train_steps_in(self, flag: dict) -> None:
        tc, p = self.recipe.train, self.progress
        t0 = time.perf_counter()
        steps = range(p.step_in_epoch, self.steps_per_epoch)
        batches = [self.d.shard(self.perm[i * self.bs:(i + 1) * self.bs]) for i in steps]
        # a streamed dataset: worker processes decode the coming batches while this one trains
        ahead = self.x.batches([s.cpu().numpy() for s in batches]) if is_lazy(self.x) else None
        for i, mine in zip(steps, batches):
            self._stop_if_signalled(flag)
            terms = self._step(mine, next(ahead) if ahead is not None else None)
            self.sched.step()
            if (budget := recheck_cpu_budget()) is not None:  # another vae job started or ended
                self.reporter.log(f"cpu: now {budget.describe()}")
                if self.shards is not None:  # the shards follow the new budget; the main thread stays light
                    torch.set_num_threads(1)
            p.step, p.step_in_epoch = p.step + 1, i + 1
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

    def _epoch_test(self) -> dict:
        """train.eval_every: the test-subset numbers (with the EMA weights swapped in for the evaluation only)
        every N epochs and on the last one; {} between."""
        p = self.progress
        if p.epoch % self.recipe.train.eval_every and p.epoch < self.planned:
            return {}
        t_eval = time.perf_counter()
        with self.ema.applied(self.model) if self.ema is not None else nullcontext():
            test = evaluate(self.model, self.data.test_x[self.epoch_eval], self.data.test_y[self.epoch_eval],
                            self.data.classes, self.rt, generative=False)
        p.eval_seconds = time.perf_counter() - t_eval
        p.spent_seconds += p.eval_seconds
        return test

    def _epoch_row(self, test: dict) -> dict:
        """The epoch's metrics.csv row (the ranks' loss sums added), kept in `progress.rows` and logged."""
        p = self.progress
        # models whose classifier is fitted after the loop (the VAE's M1 head) have no accuracy to report yet
        acc = round(test["accuracy"], 4) if test and self.model.needs_labelled_batch else ""
        keys = sorted(k for k in p.sums if k != "kl_weight")
        sums = torch.tensor([p.sums[k] for k in keys], dtype=torch.float64, device=self.rt.device)
        totals = self.d.sum_(sums).tolist()
        row = {"epoch": p.epoch, "step": p.step,
               **{f"train_{k}": round(v / len(self.x), 5) for k, v in zip(keys, totals)},
               "kl_weight": round(min(1.0, p.step / self.warmup) if self.warmup else 1.0, 4),
               "lr": f"{self.sched.get_last_lr()[0]:.3g}", "test_elbo": round(test["elbo"], 4) if test else "",
               "test_accuracy": acc, "seconds": round(p.epoch_seconds, 3)}
        p.rows.append(row)
        shown = (f"  test elbo {row['test_elbo']:.3f}" if test else "") + (f"  acc {acc:.4f}" if acc != "" else "")
        self.reporter.log(f"epoch {p.epoch}/{self.planned}  loss {row.get('train_loss', float('nan')):.3f}"
                          f"{shown}  {row['seconds']:.1f}s")
        return row
