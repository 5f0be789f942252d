"""`vae embed`: latent codes of image files, streamed in batches to .npy, .csv or .parquet."""

from __future__ import annotations

from pathlib import Path

import typer

from vae_cli.cli.app import Device, command, err, path_args, runtime_name
from vae_cli.core.errors import UsageError

SUFFIXES = (".npy", ".csv", ".parquet")


@command("embed", computes=True)
def embed(
    weights: Path = typer.Argument(..., help="A model.safetensors written by `vae train`."),
    paths: list[str] = typer.Argument(..., help="Image files, folders (searched recursively) and globs; '-' reads "
                                                "one path per line from standard input."),
    output: Path = typer.Option(..., "-o", "--output", help="FILE.npy (+ FILE.paths.txt), FILE.csv or FILE.parquet "
                                "(needs pyarrow: pip install 'vae-cli[parquet]')."),
    logvar: bool = typer.Option(False, "--logvar", help="Also write the log-variances of q(z|x)."),
    batch_size: int = typer.Option(256, "--batch-size", min=1),
    device: Device = typer.Option(Device.auto, "--device"),
) -> None:
    """Write the latent means (and with --logvar the log-variances) of q(z|x) for image files, decoded as
    `classify` decodes them. Files stream through in batches, so a folder larger than memory works; the
    output appears only when complete. Bad images: reported, skipped, then exit 2."""
    suffix = output.suffix.lower()
    if suffix not in SUFFIXES:
        raise UsageError(f"--output must end in {', '.join(SUFFIXES)}, got '{output}'")
    from vae_cli.api import load
    from vae_cli.artifacts.tables import embedding_writer, paths_file
    from vae_cli.core.fsutil import check_output

    check_output(output, [weights])
    if suffix == ".npy":
        check_output(paths_file(output), [weights], "paths file")
    from vae_cli.data.images import expand_paths

    files = expand_paths(path_args(paths))
    model = load(weights, runtime_name(device))
    failures, n = [], 0
    with embedding_writer(output, model.latent_dim, logvar) as write:
        for batch in model.embed_files(files, batch_size):
            failures += batch.failures
            if batch.paths:
                write(batch.paths, batch.mean, batch.logvar)
                n += len(batch.paths)
    for f in failures:
        err(f"error: {f}")
    err(f"wrote {n} embeddings ({model.latent_dim} dimensions{', with log-variances' if logvar else ''}) "
        f"to {output}")
    if failures:
        err(f"{len(failures)} of {len(files)} images could not be embedded")
        raise typer.Exit(UsageError.exit_code)
