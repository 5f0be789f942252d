"""`vae info`: a weights file's metadata, the recipe reference (--defaults) and the registries."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from vae_cli.cli import output as show
from vae_cli.cli.app import command
from vae_cli.core.errors import UsageError


@command("info", computes=False)
def info(
    weights: Path | None = typer.Argument(None, help="A model.safetensors written by `vae train`."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    defaults: bool = typer.Option(False, "--defaults", help="Print every recipe key with default and help."),
    models: bool = typer.Option(False, "--models", help="List the registered models."),
    recipes: bool = typer.Option(False, "--recipes", help="List the shipped recipes (`vae train NAME` runs one)."),
) -> None:
    """Show a weights file's metadata (model, data, classes, image shape, metrics, version)."""
    if defaults:
        from vae_cli.core.recipe import defaults_yaml

        print(defaults_yaml(), end="")
        return
    if recipes:
        from vae_cli.core import builtin

        listing = {n: {"path": str(builtin.path_of(n)), "summary": builtin.summary(n)}
                   for n in builtin.names()}
        if as_json:
            show.print_json(listing)
        else:
            width = max(map(len, listing)) + 2
            for n, v in listing.items():
                print(f"{n.ljust(width)}{v['summary']}")
        return
    if models:
        from vae_cli.core.recipe_rules import model_keys
        from vae_cli.models import REGISTRY

        for name, cls in sorted(REGISTRY.items()):
            print(f"{name}\t{(cls.__doc__ or sys.modules[cls.__module__].__doc__ or '').strip().splitlines()[0]}")
            head = ", train.head_steps" if cls.fits_head else ""
            print(f"\tkeys: {', '.join('model.' + k for k in model_keys(name) if k != 'name')}{head}")
        return
    if weights is None:
        raise UsageError("give a weights file (vae info runs/NAME/model.safetensors), or --defaults / --models / "
                         "--recipes")
    from vae_cli.artifacts.checkpoint import read_metadata
    from vae_cli.evaluation.catalog import describe_reject

    meta = read_metadata(weights)
    meta["labelled_count"] = len(meta.pop("labelled_indices", []))
    if as_json:
        show.print_json(meta)
        return
    from vae_cli.core import recipe as recipe_mod
    from vae_cli.core.errors import CheckpointError, RecipeError

    try:  # the recipe as the file's model would be rebuilt from it (defaults filled, values checked)
        r = recipe_mod.from_dict(meta["recipe"]).to_dict()
    except RecipeError as e:
        raise CheckpointError(f"'{weights}' carries a recipe this version cannot read ({e})") from None
    rows = [("file", str(weights)), ("model", meta["model"]), ("dataset", r["data"]["name"]),
            ("classes", ", ".join(meta["classes"])), ("image shape", "x".join(map(str, meta["image_shape"]))),
            ("latent dim", r["model"]["latent_dim"]), ("likelihood", r["model"]["likelihood"]),
            ("labelled images", meta["labelled_count"]), ("version", meta.get("version", "?")),
            ("created", meta.get("created", "?"))]
    rows += [(f"metric {k}", v) for k, v in meta.get("metrics", {}).items()]
    rej = meta.get("reject")
    if rej:
        rows.append(("--reject threshold", describe_reject(rej)))
        if rej.get("components"):  # which scores `--reject-score` can pick (`vae calibrate` renews them)
            rows.append(("--reject scores", ", ".join(sorted(rej["components"]))))
    show.table(None, rows)
