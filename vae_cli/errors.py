"""Errors the user can act on, each mapped to one documented exit code.

Every subcommand turns a `VaeError` into one line on stderr and its exit code (no traceback unless
`--debug`). Anything else escaping a command is a bug or a runtime failure: exit 1.
"""

from __future__ import annotations

# The exit-code table (README.md, "Exit codes"). Keep the two in sync.
EXIT_OK = 0
EXIT_RUNTIME = 1  # training diverged, out of memory, an unexpected failure
EXIT_USAGE = 2  # bad argument, recipe, image, checkpoint or data (the input is wrong; fix it and rerun)
EXIT_INTERRUPTED = 130  # SIGINT (Ctrl-C)
EXIT_BROKEN_PIPE = 141  # stdout closed early (`vae ... | head`), as a SIGPIPE death would report


class VaeError(Exception):
    """Base class: a message meant for the user and the exit code that goes with it."""

    exit_code = EXIT_RUNTIME


class UsageError(VaeError):
    """The input is wrong: an argument, a recipe key, a file. The message says how to fix it."""

    exit_code = EXIT_USAGE


class RecipeError(UsageError):
    pass


class DataError(UsageError):
    pass


class CheckpointError(UsageError):
    pass


class ImageError(UsageError):
    pass
