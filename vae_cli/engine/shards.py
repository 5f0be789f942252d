"""Training numerics that do not depend on how many cores run them (issue 30).

`vae` jobs share the cores of a machine (`core/peers.py`): a training that started alone takes one thread
when a second job starts and both again when it ends. CPU kernels cut their reductions by the number of
threads (a convolution's weight gradient sums over the batch in per-thread pieces), so a thread count that
changes mid-run changed the weights: a run beside another job, or killed and resumed while others came and
went, was not bit-identical to one alone.

So on the CPU every step's batch is cut into a fixed number of shards (`train.shards`, by default the
machine's cores, saved with the run), and each shard is computed by a worker thread with one intra-op thread
and its own random generator (derived from the seed, the step and the shard: `core/rng.py`). The shards'
gradients are added in shard order. How many shards run at the same moment follows the cores granted now
(all of them alone, one after another beside another job): that changes the speed, never a number. Each
shard is a replica of the model with its own batch-norm statistics, as a DDP rank is; the model's own
statistics are shard 0's, as DDP broadcasts rank 0's. The gradient norm (clipping, skipping) is computed on a
one-thread worker too; the optimizer and EMA updates are elementwise and so the same on any number of threads.

CUDA, DDP (the ranks are the shards) and torch.compile keep the plain one-pass step.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch import nn

from vae_cli.core import rng
from vae_cli.core.pool import single_thread

MAX_AUTO = 8  # shards chosen automatically: at most this many ...
MIN_IMAGES = 32  # ... each of at least this many images (batch-norm statistics of a few images are noise) ...
MIN_VALUES = 1 << 14  # ... and of this many input values: below it a step is Python overhead, not arithmetic
# (the 8x8 digits, 64 a step: one shard ran at 4,673 images/s alone, two at 4,597, and beside a second
# training 5,100 against 3,400; BENCHMARKS.md session 16)


def auto_count(cores: int, batch_size: int, values_per_image: int = 1 << 20) -> int:
    """`train.shards: 0`: one shard per core of the machine (the cores before any sharing with other jobs),
    at most `MAX_AUTO`, each of at least `MIN_IMAGES` images and `MIN_VALUES` input values."""
    return max(1, min(cores, MAX_AUTO, batch_size // MIN_IMAGES, batch_size * values_per_image // MIN_VALUES))


def shard_seed(seed: int, step: int, shard: int) -> int:
    digest = hashlib.blake2b(f"vae-shard:{seed}:{step}:{shard}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class Shards:
    """`n` replicas of `model` (the first is the model itself) and the worker threads that run them: shard i
    always on worker i, and the one-thread reductions (`call`, `reduce`) on worker 0. A thread carries state
    into the kernels it runs (its OpenMP thread count, set lazily by torch from a process-wide value; the
    floating-point control flags that kernels may set), so each worker runs the same kernels in the same order
    whatever the concurrency, and no shard lands on whichever thread happened to be idle."""

    def __init__(self, model: nn.Module, n: int, seed: int):
        self.model, self.n, self.seed = model, n, seed
        self.replicas = [model] + [copy.deepcopy(model) for _ in range(n - 1)]
        self.workers = [ThreadPoolExecutor(1, thread_name_prefix=f"vae-shard{i}", initializer=single_thread)
                        for i in range(n)]
        # every worker started now, not on demand: a thread's start sets its thread count, and torch's
        # set_num_threads also empties oneDNN's computation cache, which must not happen while a shard computes
        for f in [w.submit(lambda: None) for w in self.workers]:
            f.result()

    def close(self) -> None:
        for w in self.workers:
            w.shutdown(wait=True)

    def _sync(self) -> None:
        """Every replica starts the step with the model's weights and batch-norm statistics."""
        with torch.no_grad():
            for rep in self.replicas[1:]:
                rep.train(self.model.training)
                for a, b in zip(rep.parameters(), self.model.parameters()):
                    a.copy_(b)
                for a, b in zip(rep.buffers(), self.model.buffers()):
                    a.copy_(b)

    def run(self, step: int, fn: Callable[[nn.Module, Any], Any], parts: list, concurrency: int) -> list:
        """fn(replica, part) for each shard (its forward and backward), at most `concurrency` at once; the
        results in shard order."""
        self._sync()
        for rep in self.replicas:
            rep.zero_grad(set_to_none=True)

        def job(i: int):
            with rng.using(torch.Generator().manual_seed(shard_seed(self.seed, step, i))):
                return fn(self.replicas[i], parts[i])

        out: list = []
        width = max(1, min(concurrency, self.n))
        for start in range(0, self.n, width):
            futures = [self.workers[i].submit(job, i) for i in range(start, min(self.n, start + width))]
            out += [f.result() for f in futures]
        return out

    def call(self, fn: Callable[[], Any]) -> Any:
        """fn() on worker 0, one thread (a reduction whose result must not depend on the cores)."""
        return self.workers[0].submit(fn).result()

    def reduce(self) -> None:
        """The mean of the shards' gradients into the model's, added in shard order (on a worker)."""
        def work() -> None:
            with torch.no_grad():
                for p, *others in zip(self.model.parameters(), *(r.parameters() for r in self.replicas[1:])):
                    total = None
                    for q in (p, *others):
                        if q.grad is not None:
                            total = q.grad.clone() if total is None else total.add_(q.grad)
                    p.grad = None if total is None else total.div_(self.n)
        self.call(work)


def split(t: torch.Tensor, n: int) -> list[torch.Tensor]:
    """`t` cut into `n` contiguous pieces along its first dimension (sizes differ by at most one)."""
    return list(torch.tensor_split(t, n))
