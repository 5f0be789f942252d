"""The console script `vae`: the Typer app with every command registered, and usage errors as one line."""

from __future__ import annotations

import os
import sys

from vae_cli.cli.app import app, err
from vae_cli.core.errors import EXIT_BROKEN_PIPE, EXIT_INTERRUPTED


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
    try:  # output still buffered (a rich table) meets a closed pipe here, after the command returned
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(EXIT_BROKEN_PIPE)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
