"""Errors the user can act on, each mapped to one documented exit code.

Every subcommand turns a `VaeError` into one line on stderr and its exit code (no traceback unless
`--debug`). Anything else escaping a command is a bug or a runtime failure: exit 1.
"""

from __future__ import annotations

import errno

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

    MAX_CHARS = 600  # a message quoting user input stays readable (and cheap) whatever the input was

    def __init__(self, message: str = ""):
        text = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in str(message)[:4 * self.MAX_CHARS])
        super().__init__(text if len(text) <= self.MAX_CHARS else text[: self.MAX_CHARS - 1] + "…")


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


# errno -> (what went wrong, what to do, exit code): operating-system errors on paths the user gave.
_OS_ERRORS = {
    errno.ENOSPC: ("no space left on the device", "free some space and rerun (training continues with --resume; "
                   "finished files were not touched)", EXIT_RUNTIME),
    errno.EDQUOT: ("disk quota exceeded", "free some space and rerun", EXIT_RUNTIME),
    errno.EROFS: ("the file system is read-only", "write somewhere else (--out, -o)", EXIT_USAGE),
    errno.EACCES: ("permission denied", "check the path's permissions or write somewhere else", EXIT_USAGE),
    errno.EPERM: ("operation not permitted", "check the path's permissions or write somewhere else", EXIT_USAGE),
    errno.ENAMETOOLONG: ("the file name is too long", "use a shorter name or path", EXIT_USAGE),
    errno.EISDIR: ("it is a folder", "give a file path", EXIT_USAGE),
    errno.ENOTDIR: ("a part of the path is a file, not a folder", "fix the path", EXIT_USAGE),
    errno.EEXIST: ("it already exists and is not what was expected", "remove it or pick another path", EXIT_USAGE),
    errno.ELOOP: ("it is a symbolic link (or a loop of them)", "remove the link or pick another path", EXIT_USAGE),
    errno.ENOENT: ("it does not exist", "check the path", EXIT_USAGE),
}


def describe_os_error(e: OSError) -> tuple[str, int] | None:
    """One line and an exit code for an operating-system error, or None when it is not one we can explain."""
    known = _OS_ERRORS.get(e.errno)
    if known is None:
        return None
    what, fix, code = known
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return str(VaeError(f"{what} while writing {e.filename or 'a file'}; {fix}")), code
    where = f" '{e.filename}'" if e.filename else ""
    return str(VaeError(f"cannot use the path{where}: {what}; {fix}")), code
