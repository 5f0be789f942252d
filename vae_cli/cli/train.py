"""`vae train`: a recipe and key=value overrides in, a run folder out (the work is in vae_cli.engine)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from vae_cli.cli import output as show
from vae_cli.cli.app import Device, Precision, command
from vae_cli.cli.completion import complete_override, complete_recipe
from vae_cli.core.errors import EXIT_NOT_PROMOTED, UsageError


@command("train", computes=True, context_settings={"allow_extra_args": False})
def train(
    recipe: str = typer.Argument(..., help="A YAML recipe file, or a shipped recipe's name (`vae info --recipes`): "
                                 "digits, mnist-100-labels, cifar10-4000-labels, ...", autocompletion=complete_recipe),
    overrides: list[str] | None = typer.Argument(None, help="key=value overrides: model.latent_dim=32 epochs=5",
                                                 autocompletion=complete_override),
    out: Path = typer.Option(Path("runs"), "--out", help="Folder that holds run folders."),
    name: str | None = typer.Option(None, "--name", help="Run folder name (default: the recipe's name)."),
    exist_ok: bool = typer.Option(False, "--exist-ok", help="Reuse runs/NAME instead of making NAME-2."),
    device: Device | None = typer.Option(None, "--device", help="auto | cpu | cuda (overrides train.device)."),
    precision: Precision | None = typer.Option(None, "--precision", help="auto | fp32 | bf16 | fp16."),
    seed: int | None = typer.Option(None, "--seed", help="Overrides the recipe's seed."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object with results and paths."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress or logs on stderr."),
    resume: bool = typer.Option(False, "--resume", help="Continue runs/NAME from its last.safetensors."),
    init: Path | None = typer.Option(None, "--init", help="Start from this model.safetensors (matching tensors by "
                                     "name and shape, class rows by class name; the recipe key train.init): a new "
                                     "run, unlike --resume, which continues an interrupted one."),
    promote: Path | None = typer.Option(None, "--promote", help="Copy the new weights here only if they beat "
                                        "the weights already there on the new test split (classes compared by "
                                        "name; exit 3 when they do not)."),
    promote_metric: str = typer.Option("accuracy", "--promote-metric", help="accuracy | elbo (higher wins)."),
) -> None:
    """Train a model from a recipe into runs/NAME/ (weights, resumable state, metrics, samples)."""
    from vae_cli.engine.promote import METRICS

    if promote_metric not in METRICS:
        raise UsageError(f"--promote-metric must be one of {', '.join(METRICS)}, got '{promote_metric}'")
    if promote is not None:
        from vae_cli.core.fsutil import check_output

        check_output(promote, what="--promote target")
    from vae_cli.core import recipe as recipe_mod

    overrides, resume = _pop_resume(list(overrides or []), resume)
    extra = [f"train.device={device.value}"] if device else []
    extra += [f"train.precision={precision.value}"] if precision else []
    extra += [f"seed={seed}"] if seed is not None else []
    extra += [f"train.init={json.dumps(str(init))}"] if init is not None else []
    r = recipe_mod.load(recipe, overrides + extra)

    from vae_cli.core.console import Reporter
    from vae_cli.engine.train import train as run_training

    result = run_training(r, out=out, name=name, exist_ok=exist_ok, resume=resume, reporter=Reporter(quiet=quiet))
    if result.rank != 0:  # under torchrun, rank 0 alone reports and promotes
        return
    decision = _promote(result, r, promote, promote_metric) if promote is not None else None
    if as_json:
        show.print_json({**result.to_json(), "promotion": decision})
    else:
        show.print_train(result.to_json(), decision)
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


def _promote(result, r, target: Path, metric: str) -> dict:
    from vae_cli.core.runtime import resolve
    from vae_cli.data import build_dataset
    from vae_cli.engine.promote import promote

    data = build_dataset(r.data, r.seed)
    return promote(result.run.weights, target, metric, data, resolve(r.train.device, r.train.precision),
                   new=result.test[metric])
