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
No torch here.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock, no sharing
    fcntl = None  # type: ignore[assignment]

ENV = "VAE_CPU_SHARE"


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
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path = folder / f"{me.pid}.lock"
        tmp = folder / f".{me.pid}.{time.monotonic_ns()}.tmp"
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
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


def _read_live(path: Path) -> Peer | None:
    """The peer announced in `path` if its process holds the lock; a dead process's file is removed."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # withdrawn meanwhile
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:  # held: alive
            data = json.loads(os.read(fd, 1 << 16) or b"{}")
            return Peer(int(data["pid"]), str(data["group"]), float(data["started"]), frozenset(data["cpus"]))
        with contextlib.suppress(OSError):
            path.unlink()  # nobody holds it: its process is gone
        return None
    except (ValueError, KeyError, TypeError):  # not ours or damaged: ignore it
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
