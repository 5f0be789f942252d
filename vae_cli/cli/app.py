"""What every subcommand shares: the Typer app, option enums and the error guard. No torch here."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from enum import Enum
from typing import Any

import typer

from vae_cli import __version__
from vae_cli.core.errors import EXIT_BROKEN_PIPE, EXIT_INTERRUPTED, EXIT_RUNTIME, VaeError, describe_os_error
from vae_cli.evaluation.catalog import REJECT_SCORES

app = typer.Typer(
    name="vae",
    help="Train Variational Autoencoders on images; classify (even with few labels), sample, reconstruct.",
    no_args_is_help=True,
    add_completion=True,
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


# The --reject scores, for help texts: from the torch-free table their registry is built on
SCORES_HELP = " | ".join(REJECT_SCORES)


class Format(str, Enum):
    table = "table"
    csv = "csv"
    json = "json"


def err(msg: str) -> None:
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
            err(f"error: {e}")
            raise typer.Exit(e.exit_code) from None
        except BrokenPipeError:  # `vae ... | head` closed stdout: stop quietly, as SIGPIPE would
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise typer.Exit(EXIT_BROKEN_PIPE) from None
        except KeyboardInterrupt:
            err("interrupted")
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except OSError as e:  # every OS error on a path: one line, and 2 when the path given is the problem
            described = describe_os_error(e)
            if described is None or _state["debug"]:
                raise
            err(f"error: {described[0]}")
            raise typer.Exit(described[1]) from None
        except MemoryError:
            err("error: out of memory; lower train.batch_size or use a smaller model")
            raise typer.Exit(EXIT_RUNTIME) from None
        except Exception as e:  # a bug or an environment failure: one line, and how to see more
            if _state["debug"]:
                raise
            err(f"error: {type(e).__name__}: {e} (rerun with --debug for the traceback)")
            raise typer.Exit(EXIT_RUNTIME) from None

    return wrapper


def _version(value: bool) -> None:
    if value:
        print(f"vae {__version__}")
        raise typer.Exit()


# The commands that compute, filled by `command(..., computes=True)`: they announce themselves to other vae jobs
# before importing torch (whose import is seconds of CPU), so a training beside them shares its cores from their
# first moment (core/peers.py); `train` announces itself once it holds its run folder's lock (a run refused with
# exit 75 is nobody's peer).
COMPUTING: set[str] = set()


def command(name: str, *, computes: bool, **settings: Any) -> Callable[[Callable], Callable]:
    """Register a subcommand, its errors turned into one line (`guarded`). Every command says whether it
    computes (loads torch and a model: it then shares the cores with other vae jobs) where it is defined."""
    def register(fn: Callable) -> Callable:
        if computes:
            COMPUTING.add(name)
        return app.command(name, **settings)(guarded(fn))
    return register


@app.callback()
def _main(
    ctx: typer.Context,
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors (or set VAE_DEBUG=1)."),
    threads: str | None = typer.Option(None, "--threads", help="CPU threads for every part of the command "
                                       "(default: the cores this process may use: affinity and cgroup quota, "
                                       "shared with the other vae jobs running; or set VAE_THREADS)."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print version."),
) -> None:
    if debug:
        _state["debug"] = True
    if threads is not None:
        from vae_cli.core import cpu

        try:
            os.environ[cpu.ENV] = str(cpu.detect(threads=threads).cores)  # children (torchrun ranks) too
        except VaeError as e:
            err(f"error: {e}")
            raise typer.Exit(e.exit_code) from None
    if ctx.invoked_subcommand in COMPUTING:
        from vae_cli.core import cpu
        from vae_cli.core.peers import SHARING

        try:
            cpu.detect()  # a bad VAE_THREADS is refused by every computing command alike
        except VaeError as e:
            err(f"error: {e}")
            raise typer.Exit(e.exit_code) from None
        if ctx.invoked_subcommand != "train":
            SHARING.register()


def runtime_name(device: Device) -> str:
    return device.value


def path_args(items: list[str]) -> list[str]:
    """Command-line paths with '-' replaced by the paths on standard input, so
    `find . -name '*.png' | vae classify model.safetensors -` works: one per line (blank lines ignored), or
    NUL-separated when the input holds a NUL byte (`find -print0`, the one format any file name fits). Names
    are bytes on Linux: read as bytes and decoded as the file system does (surrogateescape), so a name that
    is not UTF-8 still opens."""
    from vae_cli.core.errors import UsageError

    out: list[str] = []
    for item in items:
        out += _stdin_paths() if item == "-" else [item]
    if not out:
        raise UsageError("no image paths given (standard input was empty)")
    return out


def _stdin_paths() -> list[str]:
    from vae_cli.core.errors import UsageError

    closed = UsageError("'-' reads image paths from standard input, but standard input is closed; pipe the paths "
                        "in or give them as arguments")
    if sys.stdin is None:  # started with stdin closed (`<&-`, some cron setups)
        raise closed
    try:
        data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else os.fsencode(sys.stdin.read())
    except (OSError, ValueError):  # a closed or unreadable descriptor
        raise closed from None
    if b"\0" in data:
        names = data.split(b"\0")
    else:
        names = [line[:-1] if line.endswith(b"\r") else line for line in data.split(b"\n")]
    return [os.fsdecode(n) for n in names if n.strip()]


def runtime_for(device: Device, precision: str = "auto"):
    from vae_cli.core.runtime import resolve

    return resolve(device.value, precision)
