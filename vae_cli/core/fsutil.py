"""Atomic file writes: write to a temporary name in the same folder, flush, fsync, rename into place.
A crash mid-write leaves the previous version of the file intact and no half-written file behind.

Every file a command writes goes through here, so the rules for outputs live in one place
(`check_output`): an output is never one of the command's inputs, never an existing folder, device, FIFO
or socket (the atomic rename would replace it with a regular file), and an in-place rewrite keeps the
file's permission bits.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from vae_cli.core.errors import UsageError

# Temporary folders of unfinished writes start with this; a run folder's stale ones are removed on start.
TEMP_PREFIX = ".vae-tmp-"


_KINDS = ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"),
          (stat.S_ISSOCK, "a socket"))


def check_output(path: str | Path, reads: tuple[str | Path, ...] | list = (), what: str = "output") -> Path:
    """`path` as a file this command may write, or a UsageError naming the user's own path: not one of the
    files the command reads (`reads`: `vae export W -o W` would replace the weights it exports), not an
    existing folder, device, FIFO or socket. Commands call it before any work; every write calls it again."""
    path = Path(path)
    try:
        st = os.stat(path)
    except OSError:  # absent (or unreachable: the write itself says why)
        return path
    if stat.S_ISDIR(st.st_mode):
        raise UsageError(f"the {what} '{path}' is a folder; name a file inside it, e.g. {path / 'out'}{path.suffix}")
    for test, kind in _KINDS:
        if test(st.st_mode):
            raise UsageError(f"the {what} '{path}' exists and is {kind}, not a regular file; write to a file path")
    for r in reads:
        with contextlib.suppress(OSError):
            if os.path.samefile(path, r):
                raise UsageError(f"the {what} '{path}' is the file this command reads ('{r}'); writing it would "
                                 f"replace the input: name another output file")
    return path


@contextlib.contextmanager
def atomic_paths(paths: list[str | Path]) -> Iterator[list[Path]]:
    """Yields temporary paths, one per target; when the block succeeds each is fsynced and renamed onto its
    target, in order (a data file and its companion, say). On failure no target is touched.

    The temporary files sit in a private hidden folder (`.vae-tmp-*`) in the first target's folder: writers
    that make temporary files of their own next to the path they are given (safetensors does) leave them in
    there too, so a kill at any moment leaves one folder with our prefix, never a stray full-size file. A
    target that already exists keeps its permission bits; a new one gets the usual ones (umask)."""
    targets = [check_output(p) for p in paths]
    for t in targets:
        t.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{targets[0].name[:40]}.", dir=targets[0].parent))
    tmps = [tmp_dir / f"{i}-{t.name}" if len(targets) > 1 else tmp_dir / t.name for i, t in enumerate(targets)]
    try:
        yield tmps
        for tmp, target in zip(tmps, targets):
            check_output(target)  # it may have become a folder or a device while the file was computed
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.chmod(tmp, _mode_for(target))
        for tmp, target in zip(tmps, targets):
            os.replace(tmp, target)
        for folder in {t.parent for t in targets}:
            _fsync_dir(folder)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path beside `path`; on success it is fsynced and renamed onto `path`."""
    with atomic_paths([path]) as (tmp,):
        yield tmp


def _mode_for(target: Path) -> int:
    """An existing file's permission bits (an in-place rewrite of a 0444 file stays 0444), else umask's."""
    try:
        return stat.S_IMODE(os.stat(target).st_mode)
    except OSError:
        return 0o666 & ~_umask()


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # directory fsync is not supported everywhere
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_with(path: str | Path, writer: Callable[[Path], None]) -> None:
    """Atomically write `path` by calling `writer(tmp_path)`."""
    with atomic_path(path) as tmp:
        writer(tmp)
