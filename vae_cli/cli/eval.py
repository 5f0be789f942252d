"""`vae eval`: likelihood and classification numbers from a weights file (torch is imported inside)."""

from __future__ import annotations

from pathlib import Path

import typer

from vae_cli.cli import output as show
from vae_cli.cli.app import Device, Precision, command, err, runtime_for
from vae_cli.core.errors import UsageError

SPLITS = ("test", "train", "holdout")


def load_with_data(weights: Path, device: Device, precision: Precision = Precision.auto):
    """(model, metadata, dataset, runtime) with the dataset rebuilt from the recipe in the weights file."""
    from vae_cli.artifacts import checkpoint
    from vae_cli.data import build_dataset

    rt = runtime_for(device, precision.value)
    model, meta = checkpoint.load(weights, rt.device)
    r = meta["recipe_obj"]
    data = build_dataset(r.data, r.seed, read_only=True)
    if list(data.image_shape) != list(meta["image_shape"]) or len(data.classes) != len(meta["classes"]):
        raise UsageError(f"the dataset now gives images {data.image_shape} and {len(data.classes)} classes "
                         f"but the model expects {tuple(meta['image_shape'])} and {len(meta['classes'])}")
    return model, meta, data, rt


def _probe_set(data, per_class: int, seed: int):
    import numpy as np

    from vae_cli.data import labelled_subset

    counts = np.bincount(data.train_y.numpy(), minlength=len(data.classes))
    if per_class > counts.min():
        raise UsageError(f"--probe-labels {per_class} is more than the {counts.min()} training images of class "
                         f"'{data.classes[int(counts.argmin())]}'; use --probe-labels {counts.min()} or fewer")
    idx = labelled_subset(data.train_y.numpy(), per_class, None, seed)
    return data.train_x[idx], data.train_y[idx]


@command("eval", computes=True)
def eval_(
    weights: Path = typer.Argument(..., help="A model.safetensors written by `vae train`."),
    split: str = typer.Option("test", "--split", help="test | train | holdout: a split of the recipe's dataset."),
    iw_samples: int = typer.Option(100, "--iw-samples", "-k", min=0, max=100_000,
                                   help="Importance samples per image for the IWAE log-likelihood (0: skip; "
                                        "papers use 5000)."),
    probe_labels: int | None = typer.Option(None, "--probe-labels", min=1,
                                            help="Fit a linear probe and a kNN vote on latent means with N "
                                                 "training labels per class."),
    limit: int | None = typer.Option(None, "--limit", min=1, help="Evaluate N images of the split: a fixed random "
                                                                   "subset with every class about equally."),
    device: Device = typer.Option(Device.auto, "--device"),
    precision: Precision = typer.Option(Precision.fp32, "--precision",
                                        help="fp32 (default: exact log-likelihoods) | bf16 | fp16 | auto."),
    seed: int = typer.Option(0, "--seed", min=0, max=2**32 - 1, help="Seed of the ELBO's and IWAE's latent draws."),
    ood: list[str] = typer.Option([], "--ood", help="Outlier images to test --reject against (a folder, file or "
                                  "glob; repeat for more sets): AUROC, AUPR and reject rates of every score."),
    reject_rate: float | None = typer.Option(None, "--reject-rate", min=0.0, max=0.5,
                                             help="With --ood: the held-out false-reject rate that sets each "
                                                  "score's threshold (default: the recipe's)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object; keys documented in docs/METRICS.md."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress on stderr."),
) -> None:
    """Likelihood (IWAE NLL, bits/dim, ELBO, KL, active units) and classification numbers (accuracy,
    per-class precision/recall/F1, calibration, confusion matrix; latent probes with --probe-labels)."""
    if split not in SPLITS:
        raise UsageError(f"--split must be one of {', '.join(SPLITS)}, got '{split}'")
    from vae_cli.evaluation.evaluate import evaluate

    model, meta, data, rt = load_with_data(weights, device, precision)
    x, y = {"test": (data.test_x, data.test_y), "train": (data.train_x, data.train_y),
            "holdout": (data.holdout_x, data.holdout_y)}[split]
    if x is None:
        raise UsageError("this model's recipe holds no images out (data.holdout_fraction=0); use --split test")
    if limit:  # a seeded random subset that holds every class about equally (folder splits are sorted by class)
        import torch

        from vae_cli.data import class_mixed

        pick = torch.from_numpy(class_mixed(y.numpy(), limit))
        x, y = x[pick], y[pick]
    r = meta["recipe_obj"]
    probe = _probe_set(data, probe_labels, r.seed) if probe_labels else None
    from vae_cli.core.console import Reporter

    reporter = Reporter(quiet=quiet)
    progress = reporter.counter(len(x), f"IWAE K={iw_samples}") if iw_samples else None
    failures: list[str] = []
    try:
        res = evaluate(model, x, y, meta["classes"], rt, seed=seed, iw_samples=iw_samples, levels=data.levels,
                       probe=probe, progress=progress)
        res["ood"] = None
        if ood:
            res["ood"], failures = _ood(model, meta, x, ood, rt, seed, reject_rate, reporter)
    finally:
        reporter.stop()
    res = {"weights": str(weights), "split": split, "precision": rt.precision, **res}
    for f in failures:
        err(f"error: {f}")
    if as_json:
        show.print_json(res)
    else:
        show.print_eval(res)
        if res["ood"]:
            show.print_ood(res["ood"])
    if failures:
        err(f"{len(failures)} outlier images could not be read")
        raise typer.Exit(UsageError.exit_code)


def _ood(model, meta, x, items: list[str], rt, seed: int, rate: float | None, reporter):
    from vae_cli.data.images import expand_paths
    from vae_cli.evaluation.ood import ood_report

    sets = {item: expand_paths([item]) for item in items}  # each argument is one outlier set
    n = len(x) + sum(len(v) for v in sets.values())
    progress = reporter.counter(n, "--ood scores")
    return ood_report(model, meta, x, sets, rt, seed=seed, rate=rate, progress=progress)
