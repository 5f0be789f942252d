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
from vae_cli.core.errors import CheckpointError, Interrupted, UsageError
from vae_cli.core.recipe import Recipe
from vae_cli.core.runtime import Runtime, recheck_cpu_budget
from vae_cli.data import SPLIT_SEED, Dataset
from vae_cli.data.streaming import is_lazy
from vae_cli.engine import state
from vae_cli.engine.distributed import Dist
from vae_cli.engine.ema import EMA
from vae_cli.engine.schedule import adamw, lr_lambda, plan_epochs
from vae_cli.engine.shards import Shards
from vae_cli.engine.step import INJECT_NAN_ENV, Steps
from vae_cli.evaluation.evaluate import evaluate

# Per-epoch numbers in metrics.csv use 2,000 test images only, so a 10,000-image test set does not
# dominate epoch time; the final evaluation uses the whole split.
EPOCH_EVAL = 2000
# Test hook: a cheaper torch.compile backend (e.g. aot_eager) for tests of the compile plumbing.
COMPILE_BACKEND_ENV = "VAE_COMPILE_BACKEND"


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


class Loop(Steps):
    """The optimisation loop and its resumable state (its steps: engine/step.py)."""

    def __init__(self, model, data: Dataset, recipe: Recipe, rt: Runtime, run: RunDir, reporter: Reporter,
                 d: Dist | None = None):
        self.model, self.data, self.recipe, self.rt = model, data, recipe, rt
        self.run_dir, self.reporter, self.d = run, reporter, d or Dist()
        self.on_epoch: Callable[[dict], None] | None = None  # rank 0: each epoch's row (the trackers)
        tc = recipe.train
        if tc.batch_size < self.d.world:
            raise UsageError(f"train.batch_size={tc.batch_size} is the global batch and must be at least the "
                             f"number of processes ({self.d.world})")
        self._place_data(data)
        self.bs = min(tc.batch_size, len(self.x))
        self.lbs = min(tc.labelled_batch_size, len(self.lab_idx))
        self.steps_per_epoch = math.ceil(len(self.x) / self.bs)
        self.planned = tc.epochs  # with a time budget (train.minutes), re-planned after each epoch
        self.total = self.planned * self.steps_per_epoch
        self.warmup = tc.kl_warmup_epochs * self.steps_per_epoch
        self._wrap_model()
        self._optimizer()
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

    def _place_data(self, data: Dataset) -> None:
        """The training images, labels and labelled subset on the device."""
        dev = self.rt.device
        # binarize=stochastic: batches are drawn from the grey images, a fresh Bernoulli sample each step
        self.stochastic = data.train_grey is not None
        self.x = (data.train_grey if self.stochastic else data.train_x).to(dev)
        self.y = data.train_y.to(dev)
        self.lab_idx = data.labelled.to(dev)
        self.labelled = torch.zeros(len(self.x), dtype=torch.bool, device=dev)
        self.labelled[self.lab_idx] = True

    def _wrap_model(self) -> None:
        """`net`: the model in channels-last layout, under DDP and torch.compile when the recipe asks."""
        tc, model, rt = self.recipe.train, self.model, self.rt
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

    def _optimizer(self) -> None:
        """AdamW (fused where torch has the kernel), its cosine schedule (with a learning-rate warm-up for a warm
        start), the GradScaler."""
        tc = self.recipe.train
        self.opt, fused = adamw(self.model, tc)
        if tc.fused_optimizer and not fused:
            self.reporter.log(f"note: no fused AdamW kernel for {self.rt.device.type} in torch {torch.__version__}; "
                              f"using the standard one (same maths, slower; train.fused_optimizer=false hides this)")
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lr_lambda(lambda: self.total, self.steps_per_epoch if tc.init else 0))
        self.scaler = self.rt.grad_scaler()

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
