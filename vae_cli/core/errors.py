"""Errors the user can act on, each mapped to one documented exit code.

Every subcommand turns a `VaeError` into one line on stderr and its exit code (no traceback unless
`--debug`). Anything else escaping a command is a bug or a runtime failure: exit 1.
"""

from __future__ import annotations

# The exit-code table (README.md, "Exit codes"). Keep the two in sync.
EXIT_OK = 0
EXIT_RUNTIME = 1  # training diverged, out of memory, an unexpected failure
EXIT_USAGE = 2  # bad argument, recipe, image, checkpoint or data (the input is wrong; fix it and rerun)
EXIT_NOT_PROMOTED = 3  # `train --promote`: the new model did not beat the one already there (kept it)
EXIT_LOCKED = 75  # another process holds the run folder's lock (EX_TEMPFAIL: try again later)
EXIT_INTERRUPTED = 130  # SIGINT (Ctrl-C); a resumable checkpoint was written
EXIT_TERMINATED = 143  # SIGTERM; a resumable checkpoint was written
EXIT_BROKEN_PIPE = 141  # stdout closed early (`vae ... | head`), as a SIGPIPE death would report


class VaeError(Exception):
    """Base class: a message meant for the user and the exit code that goes with it.

    The message is kept to one line whatever user text it quotes: control characters (newlines in a
    bad override, say) are shown escaped."""

    exit_code = EXIT_RUNTIME

    def __init__(self, message: str = ""):
        super().__init__("".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in str(message)))


class UsageError(VaeError):
    """The input is wrong: an argument, a recipe key, a file. The message says how to fix it."""

    exit_code = EXIT_USAGE


class LockHeld(VaeError):
    exit_code = EXIT_LOCKED


class Interrupted(VaeError):
    """A signal stopped training after a resumable checkpoint was written."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


class RecipeError(UsageError):
    pass


class DataError(UsageError):
    pass


class CheckpointError(UsageError):
    pass


class ImageError(UsageError):
    pass
