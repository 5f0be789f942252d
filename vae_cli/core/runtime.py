"""Device and precision, chosen once: one `Runtime` hands out the autocast context and the GradScaler."""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from vae_cli.core import cpu
from vae_cli.core.cpu import CpuBudget
from vae_cli.core.errors import UsageError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    precision: str  # fp32 | bf16 | fp16 (resolved, never "auto")

    def autocast(self, cache: bool = True) -> contextlib.AbstractContextManager:
        """Mixed precision for a forward pass. `cache=False` for forwards that run in threads side by side
        (engine/shards.py): autocast keeps its low-precision copies of the weights in one cache for the whole
        process, and a thread leaving autocast empties it for every thread. A weight used twice in a forward
        then got one cast (its two gradients added in bf16) or two (added in fp32), depending on when another
        thread finished: the same losses, different gradients from run to run. Without the cache every use
        casts on its own, the same on any timing."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=DTYPES[self.precision], cache_enabled=cache)

    def grad_scaler(self) -> torch.amp.GradScaler:
        # Only fp16 needs loss scaling; bf16 has fp32's exponent range.
        return torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")


def cpu_has_bf16() -> bool:
    """True when the CPU has native bf16 matmul (AVX-512 BF16 / AMX), where bf16 autocast is faster."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def apply_cpu_budget(budget: CpuBudget | None = None) -> CpuBudget:
    """Set torch's intra-op and inter-op threads and the BLAS/OpenMP pools (threadpoolctl) to the budget.
    Called by every command that computes (through `resolve`), and again when the budget changes
    (`recheck_cpu_budget`: another vae job started or ended)."""
    budget = budget or cpu.current()
    torch.set_num_threads(budget.intra_op)
    with contextlib.suppress(RuntimeError):  # inter-op threads can be set only before they first run
        torch.set_num_interop_threads(budget.inter_op)
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(budget.intra_op)  # numpy/scikit-learn's BLAS and OpenMP (t-SNE, probes)
    except ImportError:  # scikit-learn brings threadpoolctl; without it only torch is limited
        pass
    _applied["budget"] = budget
    return budget


_applied: dict = {}


def cpu_budget() -> CpuBudget:
    """The budget in force: decided again on each call (--threads, $VAE_THREADS, affinity, quota and the
    peers' lock files are cheap to read) and applied when it changed."""
    budget = cpu.current()
    _applied["checked"] = time.monotonic()
    return _applied["budget"] if _applied.get("budget") == budget else apply_cpu_budget(budget)


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Torch's kernels on this thread run on one core inside the block: for computations whose result is saved
    (the VAE's classifier stage) and so must not depend on how many cores the run was granted at the time."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def granted_cores() -> int:
    """The cores this process may keep busy now (the budget last applied)."""
    return _applied["budget"].cores if "budget" in _applied else cpu.current().cores


def recheck_cpu_budget(every: float = 2.0) -> CpuBudget | None:
    """Called between steps of long loops (training, classifying): at most every `every` seconds, the
    budget decided again (a peer started or ended); returns the new budget when it changed, else None."""
    if "budget" not in _applied or time.monotonic() - _applied.get("checked", 0.0) < every:
        return None
    before = _applied["budget"]
    after = cpu_budget()
    return after if after.cores != before.cores else None


def resolve(device: str = "auto", precision: str = "auto", local_rank: int = 0, *, budget: bool = True) -> Runtime:
    """The device and precision; with `budget`, the CPU budget applied too (announcing this process to the
    other vae jobs: `vae train` does that itself once it holds its run folder's lock, so a run refused by the
    lock never counts as a peer)."""
    if budget:
        cpu_budget()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto")
    if device not in ("cpu", "cuda"):
        raise UsageError(f"unknown device '{device}'; use auto, cpu or cuda")
    dev = torch.device(device, local_rank) if device == "cuda" else torch.device(device)
    if precision == "auto":
        if dev.type == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = "bf16" if cpu_has_bf16() else "fp32"
    if precision not in DTYPES:
        raise UsageError(f"unknown precision '{precision}'; use auto, fp32, bf16 or fp16")
    return Runtime(dev, precision)


@contextlib.contextmanager
def seeded(seed: int, device: torch.device | None = None) -> Iterator[None]:
    """torch's RNG seeded for a block and restored after it (`torch.random.fork_rng`): fixed noise for
    pictures and evaluation without disturbing the caller's random stream."""
    devices = [device] if device is not None and device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def seeded_everything(seed: int, device: torch.device | None = None) -> Iterator[None]:
    """Python's, numpy's and torch's global RNGs seeded for a block (a training job, whose loop draws from
    the global torch stream and saves it in the resumable state), each restored when the block ends."""
    py, npy = random.getstate(), np.random.get_state()
    try:
        with seeded(seed, device):
            random.seed(seed)
            np.random.seed(seed)
            yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
