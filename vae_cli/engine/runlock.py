"""One writer per run directory: an advisory `flock` on `<run>/.lock`, which records its holder.

The kernel drops a flock when its process dies, however it dies, so a lock left by a killed run is
free for the next one without any staleness heuristics; the file's text (pid, host, start time) only
serves to tell the user who holds a live lock.
"""

from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import json
import os
import socket
from pathlib import Path

from vae_cli.artifacts.rundir import RunDir
from vae_cli.core.errors import LockHeld, UsageError


class RunLock:
    def __init__(self, run_dir: str | Path):
        self.path = RunDir(Path(run_dir)).lock
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        try:  # O_NOFOLLOW: a symlink planted at .lock must not make us truncate the file it points to
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise UsageError(f"'{self.path}' is a symbolic link; remove it (a run folder's lock is a plain "
                                 f"file)") from None
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder(fd)
            os.close(fd)
            raise LockHeld(f"run folder '{self.path.parent}' is in use by {holder}; wait for it to finish, "
                           f"or train into another folder with --name") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd
        return self

    @staticmethod
    def _holder(fd: int) -> str:
        try:
            info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
            return f"pid {info['pid']} on host {info['host']} (started {info['started']})"
        except (ValueError, KeyError, OSError):
            return "another process"

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock; the file stays for the next holder
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
