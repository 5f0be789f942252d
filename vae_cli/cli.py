"""The `vae` command line. Parsing and printing only: the work happens in the engine modules, which are
imported inside each command so `vae --help` never imports torch.

Results go to stdout (a table, CSV or one JSON object); logs and progress go to stderr.
"""

from __future__ import annotations

import errno
import functools
import os
import sys
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Any

import typer

from vae_cli import __version__
from vae_cli import output as show
from vae_cli.errors import EXIT_BROKEN_PIPE, EXIT_INTERRUPTED, EXIT_NOT_PROMOTED, EXIT_RUNTIME, UsageError, VaeError

app = typer.Typer(
    name="vae",
    help="Train Variational Autoencoders on images; classify (even with few labels), sample, reconstruct.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

_state = {"debug": os.environ.get("VAE_DEBUG", "") not in ("", "0")}


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Precision(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class Format(str, Enum):
    table = "table"
    csv = "csv"
    json = "json"


def _err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def guarded(fn: Callable) -> Callable:
    """Turn user-facing errors into one line on stderr and their exit code (traceback only with --debug)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except VaeError as e:
            if _state["debug"]:
                raise
            _err(f"error: {e}")
            raise typer.Exit(e.exit_code) from None
        except BrokenPipeError:  # `vae ... | head` closed stdout: stop quietly, as SIGPIPE would
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise typer.Exit(EXIT_BROKEN_PIPE) from None
        except KeyboardInterrupt:
            _err("interrupted")
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except OSError as e:
            if e.errno != errno.ENOSPC or _state["debug"]:
                raise
            _err(f"error: no space left on the device while writing {e.filename or 'a file'}; free some space "
                 f"and rerun (training continues with --resume; finished files were not touched)")
            raise typer.Exit(EXIT_RUNTIME) from None
        except MemoryError:
            _err("error: out of memory; lower train.batch_size or use a smaller model")
            raise typer.Exit(EXIT_RUNTIME) from None
        except Exception as e:  # a bug or an environment failure: one line, and how to see more
            if _state["debug"]:
                raise
            _err(f"error: {type(e).__name__}: {e} (rerun with --debug for the traceback)")
            raise typer.Exit(EXIT_RUNTIME) from None

    return wrapper


def _version(value: bool) -> None:
    if value:
        print(f"vae {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors (or set VAE_DEBUG=1)."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print version."),
) -> None:
    if debug:
        _state["debug"] = True


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


def _runtime(device: Device):
    from vae_cli.runtime import resolve

    return resolve(device.value, "auto")


@app.command("eval")
@guarded
def eval_(
    weights: Path = typer.Argument(..., help="A model.safetensors written by `vae train`."),
    split: str = typer.Option("test", "--split", help="test | train: the split of the recipe's dataset."),
    device: Device = typer.Option(Device.auto, "--device"),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """ELBO, reconstruction term, KL, accuracy, per-class accuracy and confusion matrix."""
    if split not in ("test", "train"):
        raise UsageError(f"--split must be test or train, got '{split}'")
    from vae_cli import checkpoint
    from vae_cli.data import build_dataset
    from vae_cli.evaluate import evaluate

    rt = _runtime(device)
    model, meta = checkpoint.load(weights, rt.device)
    r = meta["recipe_obj"]
    data = build_dataset(r.data, r.seed)
    x, y = (data.test_x, data.test_y) if split == "test" else (data.train_x, data.train_y)
    if list(x.shape[1:]) != list(meta["image_shape"]) or len(data.classes) != len(meta["classes"]):
        raise UsageError(f"the dataset now gives images {tuple(x.shape[1:])} and {len(data.classes)} classes "
                         f"but the model expects {tuple(meta['image_shape'])} and {len(meta['classes'])}")
    res = {"weights": str(weights), "split": split, **evaluate(model, x, y, meta["classes"], rt)}
    if as_json:
        show.print_json(res)
        return
    show.table(f"{weights} ({split} split, {res['n']} images)",
           [("accuracy", res["accuracy"]), ("ELBO (nats/image)", res["elbo"]),
            ("reconstruction -log p(x|z)", res["recon"]), ("KL(q(z|x) || p(z))", res["kl"])]
           + [(f"accuracy[{c}]", a) for c, a in res["per_class_accuracy"].items()])
    show.print_confusion(meta["classes"], res["confusion_matrix"])


def _class_index(meta: dict, cls: str) -> int:
    classes = meta["classes"]
    if cls in classes:
        return classes.index(cls)
    if cls.isdigit() and int(cls) < len(classes):
        return int(cls)
    raise UsageError(f"--class '{cls}' is not one of the model's classes: {', '.join(classes)}")


@app.command()
@guarded
def sample(
    weights: Path = typer.Argument(..., help="A model.safetensors written by `vae train`."),
    n: int = typer.Option(64, "-n", "--num", min=1, max=4096, help="How many images."),
    cls: str | None = typer.Option(None, "--class", help="Class name or index: class-conditional samples."),
    temperature: float = typer.Option(1.0, "--temperature", min=0.0, help="Scale of the latent noise."),
    output: Path = typer.Option(Path("samples.png"), "-o", "--output", help="Grid PNG to write."),
    each: Path | None = typer.Option(None, "--each", help="Also write one PNG per image into this folder."),
    reconstruct: bool = typer.Option(False, "--reconstruct",
                                     help="Show test images (or --images) beside their reconstructions."),
    images: list[Path] | None = typer.Option(None, "--images", help="Images to reconstruct (repeatable)."),
    seed: int = typer.Option(0, "--seed", help="Seed for the latent noise."),
    device: Device = typer.Option(Device.auto, "--device"),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object with the paths written."),
) -> None:
    """Draw samples (or reconstructions) from a trained model into a PNG grid."""
    if output.suffix.lower() != ".png":
        raise UsageError(f"--output must end in .png, got '{output}'")
    import torch

    from vae_cli import checkpoint, pictures

    rt = _runtime(device)
    model, meta = checkpoint.load(weights, rt.device)
    torch.manual_seed(seed)
    with torch.no_grad(), rt.autocast():
        if reconstruct:
            x = _reconstruction_inputs(meta, images, n)
            recon = model.reconstruct(x.to(rt.device)).float().cpu()
            # pairs side by side: input, reconstruction, input, reconstruction ...
            pics = torch.stack([x, recon], 1).flatten(0, 1)
            nrow = 2 * max(1, int(len(x) ** 0.5))
        else:
            y = torch.full((n,), _class_index(meta, cls), device=rt.device) if cls is not None else None
            pics, nrow = model.sample(n, y, temperature).float().cpu(), None
    written = [str(pictures.save_grid(pics, output, nrow))]
    if each is not None:
        written += [str(p) for p in pictures.save_each(pics, each)]
    if as_json:
        show.print_json({"weights": str(weights), "written": written, "n": len(pics)})
    else:
        print(written[0] + (f" (+{len(written) - 1} files in {each})" if each else ""))


def _reconstruction_inputs(meta: dict, images: list[Path] | None, n: int):
    import torch

    c, h, w = meta["image_shape"]
    if images:
        from vae_cli.images import load_image

        return torch.stack([torch.from_numpy(load_image(p, c, (h, w))) for p in images])
    from vae_cli.data import build_dataset

    r = meta["recipe_obj"]
    return build_dataset(r.data, r.seed).test_x[:n]


@app.command()
@guarded
def classify(
    weights: Path = typer.Argument(..., help="A model.safetensors written by `vae train`."),
    paths: list[str] = typer.Argument(..., help="Image files, folders (searched recursively) and globs."),
    top_k: int = typer.Option(1, "--top-k", "-k", min=1, help="How many classes to print per image."),
    fmt: Format = typer.Option(Format.table, "--format", "-f", help="table | csv | json"),
    batch_size: int = typer.Option(256, "--batch-size", min=1),
    device: Device = typer.Option(Device.auto, "--device"),
) -> None:
    """Predict the class of each image (bad images: reported, skipped, then exit 2)."""
    from vae_cli import checkpoint
    from vae_cli.classify import classify_paths
    from vae_cli.images import expand_paths

    files = expand_paths(paths)
    rt = _runtime(device)
    model, meta = checkpoint.load(weights, rt.device)
    rows, failures = classify_paths(model, meta, files, rt, top_k=top_k, batch_size=batch_size)
    for f in failures:
        _err(f"error: {f}")
    show.print_rows(rows, fmt.value, top_k)
    if failures:
        _err(f"{len(failures)} of {len(files)} images could not be classified")
        raise typer.Exit(UsageError.exit_code)


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
            _err("aborted")
            sys.exit(EXIT_INTERRUPTED)
        if not (hasattr(e, "format_message") and hasattr(e, "exit_code")):
            raise
        ctx = getattr(e, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        _err(f"error: {e.format_message()}{hint}")
        sys.exit(e.exit_code)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
