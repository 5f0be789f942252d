"""After the training loop: the classifier stage, the final evaluation, the `--reject` calibration, the
weights file, pictures and the HTML report. Seeded on its own, so a resumed run finishes exactly like an
uninterrupted one (and every rank computes the same).
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from vae_cli.artifacts import checkpoint
from vae_cli.artifacts.rundir import RunDir
from vae_cli.core.console import Reporter
from vae_cli.core.errors import VaeError
from vae_cli.core.recipe import Recipe
from vae_cli.core.runtime import Runtime, cpu_budget, seeded, single_threaded
from vae_cli.data import Dataset
from vae_cli.data.streaming import is_lazy
from vae_cli.engine import distributed
from vae_cli.engine.distributed import Dist
from vae_cli.evaluation import reject
from vae_cli.evaluation.evaluate import evaluate

# A streamed dataset's classifier stage decodes at most this many labelled images into memory.
STREAMED_FIT_IMAGES = 50_000


def preprocess_of(data: Dataset) -> dict:
    """How `classify` must turn an image file into model input, as the training data was."""
    c, h, w = data.image_shape
    return {"channels": c, "size": [h, w], "range": [0.0, 1.0], "levels": data.levels,
            "binarize": data.levels == 2}


def calibrate_rejection(model, data: Dataset, recipe: Recipe, rt: Runtime) -> tuple[dict, Tensor | None] | None:
    """The `classify --reject` calibration on the held-out training images and the knn score's held-out
    features (see evaluation/reject.py)."""
    tc = recipe.train
    return reject.calibrate(model, data.holdout_x, data.test_x, rt, rate=tc.reject_rate, samples=tc.reject_samples,
                            seed=recipe.seed + 2, default=tc.reject_score)


@dataclass
class TrainResult:
    """What `train()` returns and `vae train --json` prints (`to_json`)."""

    run: RunDir
    device: str
    precision: str
    epochs: int
    processes: int
    rank: int
    rank_checksums: list[int]
    train_seconds: float
    test: dict[str, Any]  # the final evaluation on the whole test split (keys: docs/METRICS.md)
    pictures: dict[str, str] = field(default_factory=dict)  # picture key -> path written
    reject: dict[str, Any] | None = None  # the --reject calibration, without the held-out scores
    cpu: dict[str, Any] = field(default_factory=dict)  # the CPU budget (threads and where they came from)
    init: dict[str, Any] | None = None  # what train.init loaded (engine/warmstart.py), None without one
    finish_seconds: dict[str, float] = field(default_factory=dict)  # each stage after the loop, wall seconds

    @property
    def paths(self) -> dict[str, str]:
        return {**{k: str(v) for k, v in self.run.files().items()}, **self.pictures}

    def to_json(self) -> dict[str, Any]:
        out = {"run_dir": str(self.run.root), "paths": self.paths, "device": self.device,
               "precision": self.precision, "epochs": self.epochs, "processes": self.processes, "rank": self.rank,
               "rank_checksums": self.rank_checksums, "train_seconds": self.train_seconds, "test": self.test,
               "cpu": self.cpu, "init": self.init, "finish_seconds": self.finish_seconds}
        if self.reject is not None:
            out["reject"] = self.reject
        return out


def finish(model, data: Dataset, recipe: Recipe, rt: Runtime, run: RunDir, rows: list[dict],
           reporter: Reporter, seconds: float, d: Dist) -> TrainResult:
    """Seeded on its own (and restoring the caller's RNG after), so a resumed run finishes exactly like an
    uninterrupted one."""
    with seeded(recipe.seed + 1, rt.device):
        return _finish(model, data, recipe, rt, run, rows, reporter, seconds, d)


class Laps:
    """Wall seconds of each stage after the loop, in order: the finish of a CIFAR-10 ladder takes minutes, and
    the log and `train --json` (`finish_seconds`) say where they went."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._since = time.monotonic()

    def __call__(self, stage: str) -> None:
        now = time.monotonic()
        self.seconds[stage], self._since = round(now - self._since, 1), now


def _fit_images(data: Dataset, recipe: Recipe, reporter: Reporter) -> Tensor:
    """The labelled images the classifier stage fits on: all, or a seeded subset of a streamed dataset (so a
    dataset read from disk is not decoded whole)."""
    lab = data.labelled
    if is_lazy(data.train_x) and len(lab) > STREAMED_FIT_IMAGES:
        lab = lab[torch.randperm(len(lab), generator=torch.Generator().manual_seed(recipe.seed))[:STREAMED_FIT_IMAGES]]
        reporter.log(f"fitting the classifier on {len(lab)} of the {len(data.labelled)} labelled images "
                     f"(the dataset streams from disk)")
    return lab


def _finish(model, data: Dataset, recipe: Recipe, rt: Runtime, run: RunDir, rows: list[dict],
            reporter: Reporter, seconds: float, d: Dist) -> TrainResult:
    lap, lab = Laps(), _fit_images(data, recipe, reporter)
    # saved: the same on any cores (the codes' pass runs in one-thread batches on all of them: core/pool.py)
    with single_threaded() if rt.device.type == "cpu" else nullcontext():
        head = model.fit_classifier(data.train_x[lab].to(rt.device), data.train_y[lab].to(rt.device),
                                    recipe.train.head_steps, 256)
    lap("classifier")
    checksums = [int(c) for c in d.gather(torch.tensor([distributed.checksum(model)], device=rt.device))]
    if len(set(checksums)) > 1:
        raise VaeError(f"the {d.world} processes ended with different weights (checksums {checksums}); "
                       f"this is a bug, please report it with the recipe")
    metrics = evaluate(model, data.test_x, data.test_y, data.classes, rt)
    lap("evaluation")
    summary = {k: metrics[k] for k in ("accuracy", "elbo", "recon", "kl", "n", "recon_accuracy", "sample_accuracy")}
    summary["train_seconds"] = round(seconds, 2)
    result = TrainResult(run, rt.device.type, rt.precision, len(rows), d.world, d.rank, checksums,
                         round(seconds, 2), metrics, cpu=cpu_budget().as_dict())
    if not d.is_main:
        return result
    rejection, reference = calibrate_rejection(model, data, recipe, rt) or (None, None)
    lap("calibration")
    if rejection is not None:
        result.reject = {k: v for k, v in rejection.items() if k not in ("holdout_scores", "components")}
    checkpoint.save(run.weights, model, classes=data.classes, preprocess=preprocess_of(data),
                    metrics=summary, recipe=recipe.to_dict(),
                    extra={"labelled_indices": data.labelled.tolist(), "runtime": {
                        "device": rt.device.type, "precision": rt.precision, "processes": d.world}, "head": head,
                        "reject": rejection}, reference=reference)
    from vae_cli.artifacts import report

    facts = report.run_facts({"path": str(run.weights), "metrics": summary, "reject": rejection,
                              "runtime": {"device": rt.device.type, "precision": rt.precision, "processes": d.world}})
    result.pictures = report.write_run_pictures(model, data, recipe, rt, run.root, metrics, run.metrics, run=facts)
    lap("weights and pictures")
    result.finish_seconds = lap.seconds
    reporter.log("after the loop: " + ", ".join(f"{k} {v:.0f}s" for k, v in lap.seconds.items()))
    reporter.log(f"done in {seconds:.1f}s: test accuracy {metrics['accuracy']:.4f}, test elbo {metrics['elbo']:.3f}")
    return result
