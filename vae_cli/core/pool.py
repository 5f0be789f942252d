"""Inference over batches whose numbers do not depend on the cores (issue 30).

A CPU kernel's result can depend on how many threads run it: a float32 matrix product or convolution cuts its
reductions by thread (the digits model's features came out 1e-6 apart on 1 and 2 threads). What a training
saves after its loop is computed this way on the held-out and test images: the knn score's reference
features (a tensor of the weights file), the `--reject` thresholds and the metrics. A run that finished
while another `vae` job held half the cores wrote another weights file than the same run alone; `vae eval`
and `vae classify --reject` gave other last digits beside a job than alone.

So on the CPU every batch runs on one thread, on a worker of a small pool, and as many batches run at once
as the cores granted now (`core/peers.py`): the cores change the speed, never a number (the training's
shards do the same for the steps: `engine/shards.py`). Each batch draws from its own generator (the seed and
the batch's index, through `core/rng.py`), so the order in which batches finish does not matter either. On
a GPU the batches run in turn on the calling thread, drawing from the device's generator.
"""

from __future__ import annotations

import hashlib
import threading
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from vae_cli.core import rng
from vae_cli.core.runtime import granted_cores

MAX_WORKERS = 16  # batches at once at most, whatever the machine

_workers: list[ThreadPoolExecutor] = []
_lock = threading.Lock()


def single_thread() -> None:
    """A worker thread's initializer: its kernels run on it alone (OpenMP's thread count is per thread)."""
    torch.set_num_threads(1)


def workers(n: int) -> list[ThreadPoolExecutor]:
    """The first n workers of the process's pool, started now if new: a thread's start sets its thread count,
    and torch's set_num_threads empties oneDNN's cache, which must not happen while another batch computes."""
    with _lock:
        while len(_workers) < n:
            w = ThreadPoolExecutor(1, thread_name_prefix=f"vae-batch{len(_workers)}", initializer=single_thread)
            w.submit(lambda: None).result()
            _workers.append(w)
        return _workers[:n]


def batch_seed(seed: int, index: int) -> int:
    digest = hashlib.blake2b(f"vae-batch:{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def map_batches(fn: Callable[[Any], Any], batches: Iterable, device: torch.device, seed: int = 0,
                progress: Callable[[Any], None] | None = None) -> list:
    """[fn(b) for b in batches] without gradients, in order; on the CPU each on one thread with the generator
    of (seed, its index), at most `granted_cores()` at once. `batches` is read as the work goes (a streamed
    dataset decodes its batches on demand). `progress(b)` after each batch, in order."""
    if device.type != "cpu":
        out = []
        with torch.no_grad():
            for b in batches:
                out.append(fn(b))
                if progress is not None:
                    progress(b)
        return out

    def job(i: int, b: Any) -> Any:
        with torch.no_grad(), rng.using(torch.Generator().manual_seed(batch_seed(seed, i))):
            return fn(b)

    width = max(1, min(granted_cores(), MAX_WORKERS))
    pool = workers(width)
    out, pending = [], deque[tuple[Any, Future]]()
    for i, b in enumerate(batches):
        if len(pending) == width:
            out.append(_collect(pending, progress))
        pending.append((b, pool[i % width].submit(job, i, b)))
    while pending:
        out.append(_collect(pending, progress))
    return out


def _collect(pending: deque, progress: Callable[[Any], None] | None) -> Any:
    b, future = pending.popleft()
    result = future.result()
    if progress is not None:
        progress(b)
    return result
