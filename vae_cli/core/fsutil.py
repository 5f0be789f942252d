"""Atomic file writes: write to a temporary name in the same folder, flush, fsync, rename into place.
A crash mid-write leaves the previous version of the file intact and no half-written file behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

# Temporary folders of unfinished writes start with this; a run folder's stale ones are removed on start.
TEMP_PREFIX = ".vae-tmp-"


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path beside `path`; on success it is fsynced and renamed onto `path`.

    The temporary file sits in a private hidden folder (`.vae-tmp-*`) in the target's folder: writers that
    make temporary files of their own next to the path they are given (safetensors does) leave them in
    there too, so a kill at any moment leaves one folder with our prefix, never a stray full-size file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{path.name[:40]}.", dir=path.parent))
    tmp_path = tmp_dir / path.name
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp_path, 0o666 & ~_umask())  # temp files are 0600; finished files get the usual permissions
        os.replace(tmp_path, path)
        with contextlib.suppress(OSError):  # directory fsync is not supported everywhere
            dfd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


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
