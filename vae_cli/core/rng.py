"""Random draws that follow the thread that makes them.

A training step on the CPU is cut into shards that run on worker threads (`engine/shards.py`); torch's
global generator is one for the whole process, so two shards drawing from it at once would get each other's
numbers in whatever order the threads happen to run. Every random draw of a training step goes through the
functions here instead: they use the calling thread's generator when one is set (`using`), else torch's
global one, so code outside the sharded loop (sampling, evaluation, tests) behaves as before.

Third-party code that can only draw from the global generator (kornia's augmentations) runs inside
`global_draws()`: one thread at a time, with the global generator set from the thread's and handed back
after, so its draws are the thread's own too.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
from torch import Tensor, nn

_local = threading.local()
_GLOBAL_LOCK = threading.Lock()


def current() -> torch.Generator | None:
    """This thread's generator, or None (torch's global one is used)."""
    return getattr(_local, "gen", None)


@contextlib.contextmanager
def using(gen: torch.Generator | None) -> Iterator[None]:
    """Draws on this thread come from `gen` inside the block."""
    before = current()
    _local.gen = gen
    try:
        yield
    finally:
        _local.gen = before


@contextlib.contextmanager
def global_draws() -> Iterator[None]:
    """For code that draws from torch's global generator: with a thread generator set, that code runs alone
    and its draws come from (and advance) the thread's generator; without one, nothing changes."""
    gen = current()
    if gen is None:
        yield
        return
    with _GLOBAL_LOCK, torch.random.fork_rng(devices=[]):
        torch.set_rng_state(gen.get_state())
        yield
        gen.set_state(torch.get_rng_state())


def _kw(device) -> dict:
    gen = current()
    # a CPU generator draws for CPU tensors only; on a GPU the global CUDA generator is used (not sharded)
    return {"generator": gen} if gen is not None and torch.device(device).type == "cpu" else {}


def randn_like(t: Tensor) -> Tensor:
    return torch.randn(t.shape, dtype=t.dtype, device=t.device, **_kw(t.device))


def randn(*size: int, device=None) -> Tensor:
    return torch.randn(size, device=device, **_kw(device or "cpu"))


def rand(*size: int, device=None) -> Tensor:
    return torch.rand(size, device=device, **_kw(device or "cpu"))


def randint(low: int, high: int, size: tuple[int, ...], device=None) -> Tensor:
    return torch.randint(low, high, size, device=device, **_kw(device or "cpu"))


def bernoulli(p: Tensor) -> Tensor:
    return torch.bernoulli(p, **_kw(p.device))


def multinomial(p: Tensor, n: int, replacement: bool = False) -> Tensor:
    return torch.multinomial(p, n, replacement, **_kw(p.device))


class Dropout(nn.Module):
    """nn.Dropout with its mask drawn through `bernoulli` (inverted dropout: kept units scaled by 1/(1-p))."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        self.p = float(p)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.p >= 1.0:
            return x * 0.0
        keep = bernoulli(torch.full_like(x, 1.0 - self.p))
        return x * keep / (1.0 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"
