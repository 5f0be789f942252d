"""`vae calibrate`: the `--reject` calibration of a trained model measured again on its held-out training
images, with this version's scores (a file calibrated before the knn score gains it) or other settings (the
rate, the default score, the likelihood's samples), without retraining. The model's tensors are untouched."""

from __future__ import annotations

from pathlib import Path

from vae_cli.artifacts import checkpoint
from vae_cli.core.errors import CheckpointError, UsageError
from vae_cli.core.runtime import Runtime
from vae_cli.data import build_dataset
from vae_cli.engine.finish import calibrate_rejection
from vae_cli.evaluation import reject


def recalibrate(weights: Path, out: Path, rt: Runtime, *, rate: float | None = None, score: str | None = None,
                samples: int | None = None) -> dict:
    """Measure every --reject score on the held-out split the weights file's recipe defines and write the
    file with that calibration to `out` (the same path: in place, atomically). Returns the calibration
    without its per-image values."""
    if score is not None and score not in reject.SCORES.names():
        raise UsageError(reject.SCORES.unknown(score, "--reject-score"))
    model, meta = checkpoint.load(weights, rt.device)
    if not meta.get("reject"):  # no held-out split to trust: older versions trained on every image
        raise CheckpointError(f"'{weights}' has no --reject calibration to measure again (it was trained with "
                              "data.holdout_fraction=0 or by a version that held no images out, so every training "
                              "image may have been trained on); retrain with data.holdout_fraction > 0")
    changes = {"train.reject_rate": rate, "train.reject_score": score, "train.reject_samples": samples}
    recipe = meta["recipe_obj"].replace(**{k: v for k, v in changes.items() if v is not None})
    data = build_dataset(recipe.data, recipe.seed, read_only=True)
    if list(data.image_shape) != list(meta["image_shape"]) or data.classes != meta["classes"]:
        raise UsageError(f"the dataset at the recipe's data.root now gives {len(data.classes)} classes of "
                         f"{tuple(data.image_shape)} images, the model {len(meta['classes'])} of "
                         f"{tuple(meta['image_shape'])}: restore the training data to calibrate on its held-out split")
    held = 0 if data.holdout_x is None else len(data.holdout_x)
    before = meta["reject"].get("holdout_images")
    if held == 0 or (before is not None and before != held):
        raise UsageError(f"the training data changed since this model was trained: its held-out split had {before} "
                         f"images and now has {held}, so some may have been trained on; restore the training data "
                         "(or retrain)")
    if (why := reject.unavailable(recipe.train.reject_score, model, held)) is not None:
        raise UsageError(why.replace("train.reject_score", "--reject-score"))
    cal, reference = calibrate_rejection(model, data, recipe, rt)
    checkpoint.replace_calibration(weights, out, cal, reference)
    return {k: v for k, v in cal.items() if k not in ("holdout_scores", "components")}
