"""The process's CPU budget, decided in one place: how many cores this process may use, and from that
torch's intra-op and inter-op threads, the DataLoader workers and the image-decoding threads.

The cores come from, in order: `--threads N` / `VAE_THREADS=N` (the user knows best), else the CPU
affinity mask (`os.sched_getaffinity`: `taskset`, cpusets) capped by the cgroup CPU quota (v2 `cpu.max`,
v1 `cpu.cfs_quota_us`/`cpu.cfs_period_us`, the smallest along the cgroup's path), which is what a container
limited with `--cpus` sees; `os.cpu_count()` alone reports the host's cores there and makes torch start one
thread per host core. The cores are shared with the other `vae` jobs running on them (`core.peers`:
each job announces itself; two trainings that each took both cores of a 2-core box ran at 17% of their
alone speed, with one thread each at 70%). Under torchrun the cores are split between the ranks of a machine
(`LOCAL_WORLD_SIZE`). The cgroup files are parsed here (a few lines; no maintained library reads the
quota: psutil reports affinity only). Applying the budget to torch and to BLAS (threadpoolctl, which
scikit-learn already depends on) happens in `core.runtime.apply_cpu_budget`. No torch here.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from vae_cli.core.errors import UsageError

ENV = "VAE_THREADS"
MAX_THREADS = 1024


@dataclass(frozen=True)
class CpuBudget:
    cores: int  # CPUs this process may keep busy
    source: str  # how that was decided, for the first log line and --json

    @property
    def intra_op(self) -> int:
        return self.cores

    @property
    def inter_op(self) -> int:
        # the models run one op at a time; a second inter-op thread only helps with spare cores
        return 1 if self.cores <= 2 else 2

    @property
    def loader_workers(self) -> int:
        """DataLoader processes decoding a streamed dataset ahead: one core stays with training."""
        return max(1, min(4, self.cores - 1))

    @property
    def decode_threads(self) -> int:
        """Threads decoding image files into memory (Pillow releases the GIL while it decodes)."""
        return max(1, min(8, self.cores))

    def describe(self) -> str:
        return f"{self.cores} thread{'s' if self.cores != 1 else ''} ({self.source})"

    def as_dict(self) -> dict:
        return {"threads": self.cores, "source": self.source, "interop_threads": self.inter_op}


def _parse_threads(text: str, where: str) -> int:
    try:
        n = int(str(text).strip())
    except ValueError:
        raise UsageError(f"{where} must be a whole number of threads (1 or more), got '{str(text)[:40]}'") from None
    if not 1 <= n <= MAX_THREADS:
        raise UsageError(f"{where} must be between 1 and {MAX_THREADS}, got {n}")
    return n


def affinity_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return max(1, os.cpu_count() or 1)


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _v2_quota(root: Path, rel: str) -> float | None:
    """The smallest `cpu.max` quota from the process's cgroup up to the root (v2), in cores."""
    best = None
    parts = [p for p in rel.strip("/").split("/") if p]
    for depth in range(len(parts), -1, -1):
        text = _read(root.joinpath(*parts[:depth]) / "cpu.max")
        if not text:
            continue
        fields = text.split()
        if len(fields) >= 1 and fields[0] != "max":
            try:
                quota, period = float(fields[0]), float(fields[1]) if len(fields) > 1 else 100_000.0
            except ValueError:
                continue
            if quota > 0 and period > 0:
                best = min(best, quota / period) if best is not None else quota / period
    return best


def _v1_quota(root: Path, controllers: str, rel: str) -> float | None:
    for mount in (controllers, "cpu,cpuacct", "cpu", "cpuacct,cpu"):
        base = root / mount
        if not base.is_dir():
            continue
        for folder in (base / rel.strip("/"), base):  # in a container the mount is its own cgroup already
            quota, period = _read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us")
            if quota is None or period is None:
                continue
            try:
                q, p = float(quota), float(period)
            except ValueError:
                return None
            return q / p if q > 0 and p > 0 else None
    return None


def cgroup_quota(root: Path = Path("/sys/fs/cgroup"), self_cgroup: Path = Path("/proc/self/cgroup")) -> float | None:
    """The CPU quota of this process's cgroup in cores (1.5 = one and a half), or None when unlimited."""
    text = _read(self_cgroup)
    if not text:
        return None
    for line in text.splitlines():
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        hierarchy, controllers, rel = fields
        if hierarchy == "0" and controllers == "":  # cgroup v2 (unified)
            return _v2_quota(root, rel)
        if "cpu" in controllers.split(","):
            return _v1_quota(root, controllers, rel)
    return None


def detect(threads: int | None = None, env: Mapping[str, str] | None = None, *, affinity: int | None = None,
           quota: float | None | str = "read", place: tuple[int, int] = (0, 1)) -> CpuBudget:
    """The budget: `threads` (--threads), else $VAE_THREADS, else affinity capped by the cgroup quota, shared
    with the other `vae` jobs running on those cores (`place` = this job's place among the jobs, their
    number: `core.peers`), then split between the ranks torchrun starts on this machine.
    `affinity`/`quota` stand in for the system (tests)."""
    env = os.environ if env is None else env
    local_world = 1
    with_ranks = ""
    if env.get("LOCAL_WORLD_SIZE", "").strip().isdigit():
        local_world = max(1, int(env["LOCAL_WORLD_SIZE"]))
    if threads is not None:
        return CpuBudget(_parse_threads(str(threads), "--threads"), "--threads")
    if env.get(ENV, "").strip():
        return CpuBudget(_parse_threads(env[ENV], ENV), f"{ENV} or --threads")
    cores = affinity if affinity is not None else affinity_cores()
    limit = cgroup_quota() if quota == "read" else quota
    source = f"{cores} cores in the affinity mask"
    if limit is not None and math.ceil(limit) < cores:
        cores = max(1, math.ceil(limit))
        source = f"cgroup CPU quota {limit:g} of {source.split()[0]} cores"
    index, jobs = place
    if jobs > 1:
        base, extra = divmod(cores, jobs)  # the remainder to the earliest-started jobs
        cores = max(1, base + (1 if index < extra else 0))
        source += f", shared with {jobs - 1} other vae job{'s' if jobs > 2 else ''}"
    if local_world > 1:
        cores = max(1, cores // local_world)
        with_ranks = f", split between {local_world} ranks"
    return CpuBudget(cores, source + with_ranks)


def current() -> CpuBudget:
    """The budget now, with this process announced to its peers (first call) and their number counted."""
    from vae_cli.core.peers import SHARING

    place = SHARING.place()
    budget = detect(place=place)
    return CpuBudget(budget.cores, f"{budget.source}; {SHARING.problem}") if SHARING.problem else budget
