"""Promotion for retraining jobs: copy new weights over the production ones only if they score better on the
same images (the new run's test split): the new model as training just measured it there, the old one here by
the same measure. Ties keep the old model.

Accuracy compares class *names*: a class list that grew (a new class folder), shrank or was reordered since the
production model was trained does not stop a nightly retrain-and-promote. An image of a class the old model does
not know counts as a miss for it, as it would for a user asking that model; the decision says which classes
those were. The ELBO needs the same image shape only."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from vae_cli.artifacts import checkpoint
from vae_cli.core import fsutil
from vae_cli.core.errors import CheckpointError
from vae_cli.core.runtime import Runtime
from vae_cli.data import Dataset

METRICS = ("accuracy", "elbo")  # both: higher is better


def score(model, classes: list[str], data: Dataset, rt: Runtime, metric: str) -> float:
    """`metric` of `model` (whose outputs are `classes`, in its order) on `data`'s test images."""
    from vae_cli.evaluation.evaluate import evaluate, predict

    if metric == "elbo":
        return evaluate(model, data.test_x, data.test_y, data.classes, rt, generative=False)["elbo"]
    said = np.asarray(classes, dtype=object)[predict(model, data.test_x, rt).argmax(1).numpy()]
    truth = np.asarray(data.classes, dtype=object)[data.test_y.cpu().numpy()]
    return float((said == truth).mean()) if len(truth) else 0.0


def promote(new_weights: Path, target: Path, metric: str, data: Dataset, rt: Runtime, new: float) -> dict:
    """Returns {"promoted", "metric", "new", "old", "images", "unknown_to_old", "target"}; copies atomically
    when promoted. `new` is the new model's score on `data`'s test split as training measured it (its classes
    are the split's, in its order, so `score` would give the same number)."""
    new_meta = checkpoint.read_metadata(new_weights)
    old, unknown = None, []
    if target.exists():
        old_model, old_meta = checkpoint.load(target, rt.device)
        if old_meta["image_shape"] != new_meta["image_shape"]:
            raise CheckpointError(f"cannot compare with '{target}': it reads {old_meta['image_shape']} images, the "
                                  f"new model {new_meta['image_shape']}; promote to another path")
        old = score(old_model, old_meta["classes"], data, rt, metric)
        unknown = [c for c in data.classes if c not in old_meta["classes"]] if metric == "accuracy" else []
    promoted = old is None or new > old
    if promoted:
        fsutil.write_with(target, lambda tmp: shutil.copyfile(new_weights, tmp))
    return {"promoted": promoted, "metric": metric, "new": new, "old": old, "images": len(data.test_x),
            "unknown_to_old": unknown, "target": str(target)}
