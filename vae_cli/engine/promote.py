"""Promotion for retraining jobs: copy new weights over the production ones only if they score better
on the same evaluation data (the new run's test split). Ties keep the old model."""

from __future__ import annotations

import shutil
from pathlib import Path

from vae_cli.artifacts import checkpoint
from vae_cli.core import fsutil
from vae_cli.core.errors import CheckpointError
from vae_cli.core.runtime import Runtime
from vae_cli.data import Dataset
from vae_cli.evaluation.evaluate import evaluate

METRICS = ("accuracy", "elbo")  # both: higher is better


def promote(new_weights: Path, target: Path, metric: str, data: Dataset, rt: Runtime, new_score: float) -> dict:
    """Returns {"promoted": bool, "metric", "new", "old", "target"}; copies atomically when promoted.
    `new_score` is the new model's score on `data`'s test split, as training just measured it."""
    new_meta = checkpoint.read_metadata(new_weights)
    old_score = None
    if target.exists():
        old_model, old_meta = checkpoint.load(target, rt.device)
        if old_meta["classes"] != new_meta["classes"] or old_meta["image_shape"] != new_meta["image_shape"]:
            raise CheckpointError(f"cannot compare with '{target}': it predicts {len(old_meta['classes'])} classes "
                                  f"on {old_meta['image_shape']} images, the new model {len(new_meta['classes'])} "
                                  f"on {new_meta['image_shape']}; promote to another path")
        old_score = evaluate(old_model, data.test_x, data.test_y, data.classes, rt, generative=False)[metric]
    promoted = old_score is None or new_score > old_score
    if promoted:
        fsutil.write_with(target, lambda tmp: shutil.copyfile(new_weights, tmp))
    return {"promoted": promoted, "metric": metric, "new": new_score, "old": old_score, "target": str(target)}
