"""`vae calibrate`: measure a model's `--reject` calibration again on its held-out training images, without
retraining (torch is imported inside)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from vae_cli.cli.app import SCORES_HELP, Device, Precision, command, err, runtime_for
from vae_cli.core.fsutil import check_output


@command("calibrate", computes=True)
def calibrate(
    weights: Path = typer.Argument(..., help="A model.safetensors written by `vae train`."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Write the recalibrated file here (default: "
                                       "rewrite WEIGHTS in place, atomically; its model tensors do not change)."),
    reject_score: str | None = typer.Option(None, "--reject-score", help=f"The default score to store: {SCORES_HELP} "
                                            "(default: the recipe's train.reject_score)."),
    reject_rate: float | None = typer.Option(None, "--reject-rate", min=0.0, max=0.5,
                                             help="The held-out false-reject rate (default: the recipe's)."),
    reject_samples: int | None = typer.Option(None, "--reject-samples", min=1, max=4096,
                                              help="Importance samples per image for the likelihood (default: the "
                                                   "recipe's train.reject_samples)."),
    device: Device = typer.Option(Device.auto, "--device"),
    precision: Precision = typer.Option(Precision.fp32, "--precision", help="fp32 (default) | bf16 | fp16 | auto."),
    as_json: bool = typer.Option(False, "--json", help="Print the new calibration as one JSON object."),
) -> None:
    """Measure every --reject score again on the held-out training images the model's recipe defines (the
    training data must be where the recipe says): files from older versions gain this version's scores, and
    the default score, rate or samples can change, all without retraining."""
    check_output(output or weights)
    from vae_cli.engine.recalibrate import recalibrate

    out = output or weights
    cal = recalibrate(weights, out, runtime_for(device, precision.value), rate=reject_rate, score=reject_score,
                      samples=reject_samples)
    if as_json:
        print(json.dumps({"weights": str(out), **cal}))
    else:
        rates = ", ".join(f"{n} {r:.2%}" for n, r in cal["test_reject_rates"].items() if r is not None)
        print(f"{out}: --reject {cal['score']} < {cal['threshold']:.6g} ({cal['rate']:.1%} of "
              f"{cal['holdout_images']} held-out images); test images rejected per score: {rates}")
    err(f"calibrated {out} on {cal['holdout_images']} held-out images")
