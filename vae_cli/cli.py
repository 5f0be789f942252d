"""The `vae` command line. Parsing and printing only: the work happens in the engine modules, which are
imported inside each command so `vae --help` never imports torch. This module holds `train`, `info` and
the console script; `cli_eval` (eval, plot) and `cli_use` (sample, classify) register the rest.

Results go to stdout (a table, CSV or one JSON object); logs and progress go to stderr.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from vae_cli import output as show
from vae_cli.app import Device, Precision, app, err, guarded
from vae_cli.errors import EXIT_INTERRUPTED, EXIT_NOT_PROMOTED, UsageError

__all__ = ["app", "main"]


@app.command(context_settings={"allow_extra_args": False})
@guarded
def train(
    recipe: Path = typer.Argument(..., help="YAML recipe, e.g. recipes/digits.yaml."),
    overrides: list[str] | None = typer.Argument(None, help="key=value overrides: model.latent_dim=32 epochs=5"),
    out: Path = typer.Option(Path("runs"), "--out", help="Folder that holds run folders."),
    name: str | None = typer.Option(None, "--name", help="Run folder name (default: the recipe's name)."),
    exist_ok: bool = typer.Option(False, "--exist-ok", help="Reuse runs/NAME instead of making NAME-2."),
    device: Device | None = typer.Option(None, "--device", help="auto | cpu | cuda (overrides train.device)."),
    precision: Precision | None = typer.Option(None, "--precision", help="auto | fp32 | bf16 | fp16."),
    seed: int | None = typer.Option(None, "--seed", help="Overrides the recipe's seed."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object with results and paths."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress or logs on stderr."),
    resume: bool = typer.Option(False, "--resume", help="Continue runs/NAME from its last.safetensors."),
    promote: Path | None = typer.Option(None, "--promote", help="Copy the new weights here only if they beat "
                                        "the weights already there (exit 3 when they do not)."),
    promote_metric: str = typer.Option("accuracy", "--promote-metric", help="accuracy | elbo (higher wins)."),
) -> None:
    """Train a model from a recipe into runs/NAME/ (weights, resumable state, metrics, samples)."""
    from vae_cli.promote import METRICS

    if promote_metric not in METRICS:
        raise UsageError(f"--promote-metric must be one of {', '.join(METRICS)}, got '{promote_metric}'")
    from vae_cli import recipe as recipe_mod

    overrides, resume = _pop_resume(list(overrides or []), resume)
    extra = [f"train.device={device.value}"] if device else []
    extra += [f"train.precision={precision.value}"] if precision else []
    extra += [f"seed={seed}"] if seed is not None else []
    r = recipe_mod.load(recipe, overrides + extra)

    from vae_cli.console import Reporter
    from vae_cli.train import train as run_training

    result = run_training(r, out=out, name=name, exist_ok=exist_ok, resume=resume, reporter=Reporter(quiet=quiet))
    if result.get("rank", 0) != 0:  # under torchrun, rank 0 alone reports and promotes
        return
    decision = _promote(result, r, promote, promote_metric) if promote is not None else None
    if as_json:
        show.print_json({**result, "promotion": decision})
    else:
        show.print_train(result, decision)
    if decision is not None and not decision["promoted"]:
        raise typer.Exit(EXIT_NOT_PROMOTED)


def _pop_resume(overrides: list[str], resume: bool) -> tuple[list[str], bool]:
    """`resume=true` among the overrides means --resume (handy in Makefiles that pass key=value lists)."""
    import yaml

    rest = []
    for item in overrides:
        k, sep, v = item.partition("=")
        if sep and k.strip() == "resume":
            value = yaml.safe_load(v) if v.strip() else None
            if not isinstance(value, bool):
                raise UsageError(f"resume must be true or false, got '{v}'")
            resume = resume or value
        else:
            rest.append(item)
    return rest, resume


def _promote(result: dict, r, target: Path, metric: str) -> dict:
    from vae_cli.data import build_dataset
    from vae_cli.promote import promote
    from vae_cli.runtime import resolve

    data = build_dataset(r.data, r.seed)
    return promote(Path(result["paths"]["weights"]), target, metric, data, resolve(r.train.device, r.train.precision),
                   new_score=result["test"][metric])


from vae_cli import cli_eval, cli_use  # noqa: E402,F401  (registers eval, plot, sample, classify)


@app.command()
@guarded
def info(
    weights: Path | None = typer.Argument(None, help="A model.safetensors written by `vae train`."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    defaults: bool = typer.Option(False, "--defaults", help="Print every recipe key with default and help."),
    models: bool = typer.Option(False, "--models", help="List the registered models."),
) -> None:
    """Show a weights file's metadata (model, data, classes, image shape, metrics, version)."""
    if defaults:
        from vae_cli.recipe import defaults_yaml

        print(defaults_yaml(), end="")
        return
    if models:
        from vae_cli.models import REGISTRY

        for name, cls in sorted(REGISTRY.items()):
            print(f"{name}\t{(cls.__doc__ or sys.modules[cls.__module__].__doc__ or '').strip().splitlines()[0]}")
        return
    if weights is None:
        raise UsageError("give a weights file (vae info runs/NAME/model.safetensors), or --defaults / --models")
    from vae_cli.checkpoint import read_metadata

    meta = read_metadata(weights)
    meta["labelled_count"] = len(meta.pop("labelled_indices", []))
    if as_json:
        show.print_json(meta)
        return
    r = meta["recipe"]
    rows = [("file", str(weights)), ("model", meta["model"]), ("dataset", r["data"]["name"]),
            ("classes", ", ".join(meta["classes"])), ("image shape", "x".join(map(str, meta["image_shape"]))),
            ("latent dim", r["model"]["latent_dim"]), ("likelihood", r["model"]["likelihood"]),
            ("labelled images", meta["labelled_count"]), ("version", meta["version"]), ("created", meta["created"])]
    rows += [(f"metric {k}", v) for k, v in meta.get("metrics", {}).items()]
    rej = meta.get("reject")
    if rej:
        rows.append(("--reject threshold", show.describe_reject(rej)))
    show.table(None, rows)


def main() -> None:
    """The console script: like `app()`, but a usage error (bad option, missing argument) is one line
    on stderr with exit code 2, like every other bad input, instead of click's multi-line box."""
    try:
        code = app(standalone_mode=False)
    except Exception as e:  # click's exception classes, duck-typed: Typer may vendor its own click
        if type(e).__name__ == "NoArgsIsHelpError":
            e.show()
            sys.exit(0)
        if type(e).__name__ == "Abort":
            err("aborted")
            sys.exit(EXIT_INTERRUPTED)
        if not (hasattr(e, "format_message") and hasattr(e, "exit_code")):
            raise
        ctx = getattr(e, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        err(f"error: {e.format_message()}{hint}")
        sys.exit(e.exit_code)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
