"""`train()`: one training job from a recipe. It picks the run folder (rank 0 under torchrun), holds its
lock, builds data and model, runs the `Loop` (resuming it when asked), then `finish` (classifier stage,
evaluation, `--reject` calibration, weights file, pictures) and returns a `TrainResult`.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path

import torch
import yaml

from vae_cli.artifacts.rundir import RunDir
from vae_cli.core import fsutil
from vae_cli.core.console import Reporter
from vae_cli.core.errors import RecipeError
from vae_cli.core.recipe import Recipe
from vae_cli.core.runtime import Runtime, cpu_budget, resolve, seeded_everything
from vae_cli.data import build_dataset
from vae_cli.engine import distributed
from vae_cli.engine.distributed import Dist
from vae_cli.engine.finish import TrainResult, finish
from vae_cli.engine.loop import Loop
from vae_cli.engine.runlock import RunLock
from vae_cli.engine.trackers import Trackers
from vae_cli.engine.trackers import require as trackers_require
from vae_cli.engine.warmstart import warm_start
from vae_cli.evaluation import reject
from vae_cli.models import build_model


def train(recipe: Recipe, *, out: str | Path = "runs", name: str | None = None, exist_ok: bool = False,
          resume: bool = False, reporter: Reporter | None = None) -> TrainResult:
    """Train per the recipe; writes the run directory and returns the results and paths. Under torchrun
    every rank runs this; rank 0 alone chooses the run folder, holds its lock and writes files."""
    trackers_require(recipe.train.loggers)
    d = distributed.setup(recipe.train.device)
    try:
        reporter = (reporter or Reporter()) if d.is_main else Reporter(quiet=True)
        rt = resolve(recipe.train.device, recipe.train.precision, d.local_rank, budget=False)
        run = RunDir.create(out, name or recipe.name or "run", exist_ok or resume) if d.is_main else None
        fresh = d.is_main and not any(run.root.iterdir())
        run = RunDir(d.share_path(run.root if run else None, rt.device))
        try:
            with RunLock(run.root) if d.is_main else nullcontext(), seeded_everything(recipe.seed, rt.device):
                cpu_budget()  # announced to the other vae jobs only now: a run refused by the lock is no peer
                return _train_in(run, recipe, resume, reporter, rt, d)
        except BaseException:
            if fresh:  # failed before writing anything (bad data, say): leave no empty runs/NAME behind
                run.remove_if_unused()
            raise
    finally:
        distributed.teardown(d)


def _train_in(run: RunDir, recipe: Recipe, resume: bool, reporter: Reporter, rt: Runtime, d: Dist) -> TrainResult:
    t_start = time.perf_counter()
    if d.is_main:
        run.remove_stale_temp_files()
    data, model = _data_and_model(recipe, rt, d)
    resuming = resume and run.state.is_file()
    init = None
    if recipe.train.init and not resuming:  # a resumed run has its weights in its state
        init = warm_start(model, recipe.train.init, data.classes,
                          lambda k: build_model(recipe.model, data.image_shape, k))
        reporter.log(init.describe())
    loop = Loop(model, data, recipe, rt, run, reporter, d)  # after the init: the EMA starts from those weights
    if init is not None:
        loop.started_warm(init.warm)
    d.barrier()  # rank 0 has cleaned the folder before anyone reads the state file
    _resume_or_begin(loop, run, recipe, resume, resuming, reporter, d)
    trackers = Trackers(recipe, run, resume and loop.progress.epoch > 1, reporter) if d.is_main else None
    loop.on_epoch = trackers.epoch if trackers else None
    reporter.log(_banner(recipe, data, rt, d, loop.progress.shards, run))
    try:
        rows = loop.run()
        loop.use_average()  # train.ema: the averaged weights are the ones evaluated and saved from here on
        result = finish(model, data, recipe, rt, run, rows, reporter, time.perf_counter() - t_start, d)
        result.init = init.as_dict() if init is not None else None
    except BaseException:
        if trackers:
            trackers.close()
        raise
    if trackers:
        trackers.finish(run, result.pictures, result.test)
    return result


def _data_and_model(recipe: Recipe, rt: Runtime, d: Dist):
    """The dataset and a freshly initialised model on the device; a `--reject` score the model cannot give
    is refused here, before any training."""
    data = build_dataset(recipe.data, recipe.seed)
    model = build_model(recipe.model, data.image_shape, len(data.classes)).to(rt.device)
    held = 0 if data.holdout_x is None else len(data.holdout_x)
    if (why := reject.unavailable(recipe.train.reject_score, model, held)) is not None:
        raise RecipeError(why)
    if d.enabled:
        torch.manual_seed(recipe.seed + 7919 * d.rank)  # the same weights everywhere, each rank its own noise
    return data, model


def _resume_or_begin(loop: Loop, run: RunDir, recipe: Recipe, resume: bool, resuming: bool, reporter: Reporter,
                     d: Dist) -> None:
    """--resume with a state file (`resuming`) continues it; otherwise the run starts and its recipe.yaml is
    written."""
    if resuming:
        loop.resume_from(run.state)
        reporter.log(f"resuming {run.root} at epoch {loop.progress.epoch}, step {loop.progress.step}")
        return
    if resume:
        reporter.log(f"nothing to resume in {run.root}: starting it from the beginning")
    if d.is_main:
        fsutil.write_text(run.recipe, yaml.safe_dump(recipe.to_dict(), sort_keys=False))


def _banner(recipe: Recipe, data, rt: Runtime, d: Dist, shards: int, run: RunDir) -> str:
    procs = f", {d.world} processes" if d.enabled else ""
    procs += f", {shards} shard{'s' if shards > 1 else ''} a step" if shards else ""
    return (f"training '{recipe.model.name}' on {recipe.data.name}: {len(data.train_x)} train "
            f"({len(data.labelled)} labelled), {len(data.test_x)} test, image {data.image_shape}, "
            f"{rt.device.type}/{rt.precision}{procs}, {cpu_budget().describe()} -> {run.root}")
