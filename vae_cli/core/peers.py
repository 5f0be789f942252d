"""Sharing the cores with the other `vae` processes on this machine (issue 14).

Two trainings that each take every core run 4-10x slower than alone on a 2-core box (OpenMP threads of
both spin on the same cores); with one thread each they keep ~70% of the alone speed. Processes started
independently (cron jobs, CI steps) cannot be told about each other, so each computing `vae` process
announces itself: a small file `<pid>.lock` in a per-user folder, held under an exclusive `flock` for the
process's life. The kernel drops the lock when the process ends however it ends (kill -9 too), so a file
whose lock can be taken belongs to a dead process and is removed by whoever finds it. A process counts the
live peers whose CPUs overlap its own and takes its share of the cores; `core.runtime` asks again every few
seconds while training or classifying, so a job that started alone shrinks when a second starts and grows
back when it ends.

torchrun ranks of one job form one group (`TORCHELASTIC_RUN_ID`): the group gets a share, its ranks split it.
The folder: `$VAE_CPU_SHARE` (a path, or `off` to disable), else `$XDG_RUNTIME_DIR/vae-cpu`, else
`<tmp>/vae-cpu-<uid>`. Only `vae` processes are counted; other programs are not (the load average cannot
tell a peer's threads from this process's own). Linux/macOS only (`fcntl`); elsewhere nothing is shared.

The folder sits in a shared place (/tmp), so it is trusted only as ssh-agent, tmux and systemd trust theirs:
created 0700, and used only when `lstat` shows a real folder (not a link) owned by this user that no one
else may write; otherwise this process does not share, says so once on stderr, and touches nothing there.
Lock files are opened with O_NOFOLLOW | O_NONBLOCK and read only when they are regular files (a FIFO planted
as `1.lock` cannot hang anyone), at most `MAX_LOCK_BYTES`, and content that is not exactly what
`Registration` writes is junk: ignored, never deleted. No torch here.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import math
import os
import stat
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock, no sharing
    fcntl = None  # type: ignore[assignment]

ENV = "VAE_CPU_SHARE"
MAX_LOCK_BYTES = 4096  # a registration is ~100 bytes; anything longer is not ours
NOFOLLOW = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)


class UnsafeFolder(OSError):
    """The sharing folder is not a private folder of this user's."""


def check_folder(folder: Path) -> None:
    """Raise UnsafeFolder unless `folder` (not following links) is a folder owned by this user that only
    this user may write to."""
    st = os.lstat(folder)
    why = None
    if stat.S_ISLNK(st.st_mode):
        why = "is a symbolic link"
    elif not stat.S_ISDIR(st.st_mode):
        why = "is not a folder"
    elif hasattr(os, "getuid") and st.st_uid != os.getuid():
        why = f"belongs to another user (uid {st.st_uid})"
    elif st.st_mode & 0o022:
        why = f"may be written by other users (mode {stat.S_IMODE(st.st_mode):o})"
    if why:
        raise UnsafeFolder(f"{folder} {why}")


@dataclass(frozen=True)
class Peer:
    pid: int
    group: str
    started: float
    cpus: frozenset[int]


def share_dir(env: dict | None = None) -> Path | None:
    env = os.environ if env is None else env
    value = env.get(ENV, "").strip()
    if value.lower() in ("off", "0", "no", "false"):
        return None
    if value:
        return Path(value)
    if env.get("XDG_RUNTIME_DIR"):
        return Path(env["XDG_RUNTIME_DIR"]) / "vae-cpu"
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    return Path(tempfile.gettempdir()) / f"vae-cpu-{uid}"


def my_cpus() -> frozenset[int]:
    try:
        return frozenset(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return frozenset(range(os.cpu_count() or 1))


def my_group() -> str:
    run = os.environ.get("TORCHELASTIC_RUN_ID")
    return f"torchrun:{run}" if run else f"pid:{os.getpid()}"


class Registration:
    """This process's announcement; `close()` (or the process ending) withdraws it."""

    def __init__(self, folder: Path, me: Peer):
        self.folder, self.me = folder, me
        folder.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            folder.mkdir(mode=0o700)
        check_folder(folder)
        self.path = folder / f"{me.pid}.lock"
        tmp = folder / f".{me.pid}.{time.monotonic_ns()}.tmp"
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.write(fd, json.dumps({"pid": me.pid, "group": me.group, "started": me.started,
                                     "cpus": sorted(me.cpus)}).encode())
            os.replace(tmp, self.path)  # readers only look at *.lock: never a half-written one
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        self.fd = fd

    def close(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()
        os.close(self.fd)
        self.fd = None


def parse_peer(raw: bytes) -> Peer | None:
    """A registration's content as a Peer, or None for anything else (junk is ignored, whatever it holds)."""
    if len(raw) > MAX_LOCK_BYTES:
        return None
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):  # not JSON, or nested past the parser's depth
        return None
    if not isinstance(data, dict):
        return None
    pid, group, started, cpus = (data.get(k) for k in ("pid", "group", "started", "cpus"))
    if not (type(pid) is int and 0 < pid < 1 << 31 and isinstance(group, str) and len(group) <= 256
            and type(started) in (int, float) and math.isfinite(started) and isinstance(cpus, list)
            and len(cpus) <= 65536 and all(type(c) is int and 0 <= c < 1 << 20 for c in cpus)):
        return None
    return Peer(pid, group, float(started), frozenset(cpus))


def _read_live(path: Path) -> Peer | None:
    """The peer announced in `path` if its process holds the lock; a dead process's file is removed. Only
    regular files are opened for reading (never through a link, never blocking) and only ours are removed."""
    try:
        fd = os.open(path, os.O_RDONLY | NOFOLLOW)
    except OSError:  # withdrawn meanwhile, or a link
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO, a device, a folder: not ours, leave it
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:  # held: alive
            return parse_peer(os.read(fd, MAX_LOCK_BYTES + 1))
        except OSError:
            return None
        with contextlib.suppress(OSError):
            path.unlink()  # nobody holds it: its process is gone
        return None
    finally:
        os.close(fd)


def live_peers(folder: Path, me: Peer) -> list[Peer]:
    """Live `vae` processes other than this one whose CPUs overlap this one's."""
    try:
        paths = [p for p in folder.glob("*.lock") if p.name != f"{me.pid}.lock"]
    except OSError:
        return []
    return [p for p in map(_read_live, paths) if p is not None and p.cpus & me.cpus]


def place(me: Peer, peers: list[Peer]) -> tuple[int, int]:
    """(this process's group's place among the live groups, number of groups), earliest-started first;
    `cpu.detect` splits the cores by it. Ranks of this process's own group are not competitors."""
    first: dict[str, float] = {me.group: me.started}
    for p in peers:
        first[p.group] = min(first.get(p.group, p.started), p.started)
    order = sorted(first, key=lambda g: (first[g], g))
    return order.index(me.group), len(order)


class Sharing:
    """This process's registration, made on first use and withdrawn at exit; `place()` asks who else runs."""

    def __init__(self) -> None:
        self.registration: Registration | None = None
        self.problem: str | None = None

    def register(self) -> Registration | None:
        if self.registration is not None or self.problem is not None:
            return self.registration
        folder = share_dir()
        if folder is None:
            self.problem = f"not shared: {ENV}=off"
        elif fcntl is None:
            self.problem = "not shared: no flock on this system"
        else:
            try:
                self.registration = Registration(folder, Peer(os.getpid(), my_group(), time.time(), my_cpus()))
                atexit.register(self.close)
            except UnsafeFolder as e:  # planted or foreign: run alone, touch nothing there, say so once
                self.problem = f"not shared: {e}"
                print(f"warning: cores not shared with other vae jobs: {e} (remove it, or set {ENV} to a "
                      f"private folder)", file=sys.stderr)
            except OSError as e:  # a read-only or foreign folder: run alone, and say so in the budget's source
                self.problem = f"not shared: cannot use {folder} ({e.strerror or e})"
        return self.registration

    def place(self) -> tuple[int, int]:
        """(place, groups) as in `place`; (0, 1) when not shared."""
        reg = self.register()
        return (0, 1) if reg is None else place(reg.me, live_peers(reg.folder, reg.me))

    def close(self) -> None:
        # a forked child (a DataLoader worker) inherits the object but must not withdraw its parent
        if self.registration is not None and self.registration.me.pid == os.getpid():
            self.registration.close()
            self.registration = None


SHARING = Sharing()
