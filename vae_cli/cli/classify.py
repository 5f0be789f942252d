"""`vae classify`: the class of each image file, and with --reject whether it is like the training data."""

from __future__ import annotations

from pathlib import Path

import typer

from vae_cli.cli import output as show
from vae_cli.cli.app import SCORES_HELP, Device, Format, command, err, path_args, runtime_name
from vae_cli.core.errors import UsageError


@command("classify", computes=True)
def classify(
    weights: Path = typer.Argument(..., help="A model.safetensors written by `vae train`."),
    paths: list[str] = typer.Argument(..., help="Image files, folders (searched recursively) and globs; '-' reads "
                                                "one path per line from standard input."),
    top_k: int = typer.Option(1, "--top-k", "-k", min=1, help="How many classes to print per image."),
    fmt: Format = typer.Option(Format.table, "--format", "-f", help="table | csv | json"),
    batch_size: int = typer.Option(256, "--batch-size", min=1),
    reject: bool = typer.Option(False, "--reject", help="Flag images unlike the training data (a score below "
                                "the threshold calibrated on held-out training images)."),
    reject_score: str | None = typer.Option(None, "--reject-score",
                                            help=f"With --reject: {SCORES_HELP} (default: the one the model "
                                                 "was calibrated with)."),
    reject_rate: float | None = typer.Option(None, "--reject-rate", min=0.0, max=0.5,
                                             help="With --reject: the held-out false-reject rate that sets "
                                                  "the threshold (default: the recipe's train.reject_rate)."),
    device: Device = typer.Option(Device.auto, "--device"),
) -> None:
    """Predict the class of each image; --reject also flags images the model finds unlikely (bad images:
    reported, skipped, then exit 2)."""
    from vae_cli.api import load
    from vae_cli.data.images import expand_paths

    files = expand_paths(path_args(paths))  # bad paths are reported before the model is loaded
    model = load(weights, runtime_name(device))
    top_k = min(top_k, len(model.classes))  # a model with K classes has K to show, whatever was asked
    rows, failures = model.classify_files(files, top_k=top_k, batch_size=batch_size, reject=reject,
                                          reject_rate=reject_rate, reject_score=reject_score)
    for f in failures:
        err(f"error: {f}")
    show.print_rows(rows, fmt.value, top_k)
    if model.last_gate is not None:
        g = model.last_gate
        rejected = sum(r["rejected"] for r in rows)
        err(f"rejected {rejected} of {len(rows)} images as unlike the training data ({g.name} score < "
            f"{g.threshold:.4g}; {g.rate:.1%} of held-out training images fall below it)")
    if failures:
        err(f"{len(failures)} of {len(files)} images could not be classified")
        raise typer.Exit(UsageError.exit_code)
