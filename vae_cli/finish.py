"""After the training loop: the classifier stage, the final evaluation, the `--reject` calibration, the
weights file, pictures and the HTML report. Seeded on its own, so a resumed run finishes exactly like an
uninterrupted one (and every rank computes the same).
"""

from __future__ import annotations

import torch

from vae_cli import checkpoint, distributed
from vae_cli.console import Reporter
from vae_cli.data import Dataset
from vae_cli.distributed import Dist
from vae_cli.errors import VaeError
from vae_cli.evaluate import evaluate, log_likelihood
from vae_cli.metrics import rejection_threshold
from vae_cli.recipe import Recipe
from vae_cli.runtime import Runtime
from vae_cli.streaming import is_lazy

# A streamed dataset's classifier stage decodes at most this many labelled images into memory.
STREAMED_FIT_IMAGES = 50_000
# Test images scored to report the false-reject rate that the held-out threshold gives on new data.
REJECT_CHECK_IMAGES = 2000


def preprocess_of(data: Dataset) -> dict:
    """How `classify` must turn an image file into model input, as the training data was."""
    c, h, w = data.image_shape
    return {"channels": c, "size": [h, w], "range": [0.0, 1.0], "levels": data.levels,
            "binarize": data.levels == 2}


def calibrate_rejection(model, data: Dataset, recipe: Recipe, rt: Runtime) -> dict | None:
    """The `classify --reject` threshold: the `train.reject_rate` quantile of the IWAE score log p(x) on
    the held-out training images (continuous density: user images need not sit on the data's grid).
    The sorted held-out scores travel too, so `classify --reject-rate` can pick another rate."""
    if data.holdout_x is None or len(data.holdout_x) == 0:
        return None
    tc = recipe.train
    scores = log_likelihood(model, data.holdout_x, tc.reject_samples, None, rt, seed=recipe.seed + 2)
    threshold = rejection_threshold(scores, tc.reject_rate)
    test = log_likelihood(model, data.test_x[:REJECT_CHECK_IMAGES], tc.reject_samples, None, rt,
                          seed=recipe.seed + 3)
    return {"score": "iwae_log_likelihood", "samples": tc.reject_samples, "rate": tc.reject_rate,
            "threshold": threshold, "holdout_images": len(scores),
            "test_reject_rate": float((test < threshold).float().mean().item()) if len(test) else None,
            "holdout_scores": [round(v, 3) for v in scores.sort().values.tolist()]}


def finish(model, data: Dataset, recipe: Recipe, rt: Runtime, paths: dict, rows: list[dict],
           reporter: Reporter, seconds: float, d: Dist) -> dict:
    torch.manual_seed(recipe.seed + 1)
    lab = data.labelled
    if is_lazy(data.train_x) and len(lab) > STREAMED_FIT_IMAGES:  # do not decode a whole streamed dataset
        lab = lab[torch.randperm(len(lab), generator=torch.Generator().manual_seed(recipe.seed))[:STREAMED_FIT_IMAGES]]
        reporter.log(f"fitting the classifier on {len(lab)} of the {len(data.labelled)} labelled images "
                     f"(the dataset streams from disk)")
    head = model.fit_classifier(data.train_x[lab].to(rt.device), data.train_y[lab].to(rt.device),
                                recipe.train.head_steps, 256)
    checksums = [int(c) for c in d.gather(torch.tensor([distributed.checksum(model)], device=rt.device))]
    if len(set(checksums)) > 1:
        raise VaeError(f"the {d.world} processes ended with different weights (checksums {checksums}); "
                       f"this is a bug, please report it with the recipe")
    metrics = evaluate(model, data.test_x, data.test_y, data.classes, rt)
    summary = {k: metrics[k] for k in ("accuracy", "elbo", "recon", "kl", "n")}
    summary["train_seconds"] = round(seconds, 2)
    result = {"run_dir": str(paths["run_dir"]), "paths": {k: str(v) for k, v in paths.items()},
              "device": rt.device.type, "precision": rt.precision, "epochs": len(rows), "processes": d.world,
              "rank": d.rank,
              "rank_checksums": checksums, "train_seconds": round(seconds, 2), "test": metrics}
    if not d.is_main:
        return result
    reject = calibrate_rejection(model, data, recipe, rt)
    if reject is not None:
        result["reject"] = {k: v for k, v in reject.items() if k != "holdout_scores"}
    checkpoint.save(paths["weights"], model, classes=data.classes, preprocess=preprocess_of(data),
                    metrics=summary, recipe=recipe.to_dict(),
                    extra={"labelled_indices": data.labelled.tolist(), "runtime": {
                        "device": rt.device.type, "precision": rt.precision, "processes": d.world}, "head": head,
                        "reject": reject})
    from vae_cli import report

    facts = report.run_facts({"path": str(paths["weights"]), "metrics": summary, "reject": reject,
                              "runtime": {"device": rt.device.type, "precision": rt.precision, "processes": d.world}})
    result["paths"].update(report.write_run_pictures(model, data, recipe, rt, paths["run_dir"], metrics,
                                                     paths["metrics"], run=facts))
    reporter.log(f"done in {seconds:.1f}s: test accuracy {metrics['accuracy']:.4f}, test elbo {metrics['elbo']:.3f}")
    return result
