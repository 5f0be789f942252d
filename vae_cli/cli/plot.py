"""`vae plot`: the run's pictures and report.html again, from a weights file."""

from __future__ import annotations

from pathlib import Path

import typer

from vae_cli.cli import output as show
from vae_cli.cli.app import Device, command
from vae_cli.cli.eval import load_with_data
from vae_cli.core.errors import UsageError


@command("plot", computes=True)
def plot(
    weights: Path = typer.Argument(..., help="A model.safetensors written by `vae train`."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Folder for the PNGs and report.html "
                                                              "(default: the weights file's folder)."),
    iw_samples: int = typer.Option(0, "--iw-samples", "-k", min=0, max=100_000,
                                   help="Also put the IWAE NLL with this many samples in the report."),
    latent_map: str | None = typer.Option(None, "--map", help="tsne | pca: the latent map's projection "
                                                              "(default: the recipe's train.latent_map)."),
    device: Device = typer.Option(Device.auto, "--device"),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object with the paths written."),
) -> None:
    """Draw the run's pictures again (samples, by class, reconstructions, interpolations, latent map,
    training curves from metrics.csv beside the weights, confusion matrix) and report.html."""
    if latent_map not in (None, "tsne", "pca"):
        raise UsageError(f"--map must be tsne or pca, got '{latent_map}'")
    from vae_cli.artifacts import report
    from vae_cli.artifacts.rundir import RunDir
    from vae_cli.evaluation.evaluate import evaluate

    out = out or weights.parent
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out '{out}' is not a folder; name a folder for the PNGs and report.html")
    model, meta, data, rt = load_with_data(weights, device)
    metrics = evaluate(model, data.test_x, data.test_y, meta["classes"], rt, iw_samples=iw_samples,
                       levels=data.levels)
    written = report.write_run_pictures(model, data, meta["recipe_obj"], rt, out, metrics,
                                        RunDir.of_weights(weights).metrics, latent_map,
                                        run=report.run_facts({**meta, "path": str(weights)}))
    if as_json:
        show.print_json({"weights": str(weights), "written": written})
    else:
        for path in written.values():
            print(path)
