"""Image files that stay on disk: folder datasets too large to decode into memory.

`FileImages` stands where a (N, C, H, W) tensor would: it has `len`, `shape`, `ndim`, indexing (which
decodes the chosen files and returns a tensor) and `split(n)` (decoded batches, in order, from a
DataLoader with worker processes). The training loop asks `batches()` for the epoch's batches, so the
next ones decode in `workers` processes while the model trains on the current one. Every file goes
through `images.load_image`, exactly as when the whole set is decoded up front, so a streamed run and an
in-memory run of the same recipe train on identical tensors (a test compares their weights).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from vae_cli.core.errors import DataError, ImageError
from vae_cli.data.images import load_image


def decode_files(paths, channels: int, size: tuple[int, int]) -> Tensor:
    arrays = []
    for p in paths:
        try:
            arrays.append(load_image(p, channels, size))
        except ImageError as e:
            raise DataError(f"{e} (found while streaming the folder dataset; remove or replace the file)") from None
    if not arrays:
        return torch.empty(0, channels, *size)
    return torch.from_numpy(np.stack(arrays))


class _Decode(torch.utils.data.Dataset):
    """Item = the decoded batch of the file positions it is asked for (one worker decodes a whole batch).
    A bad file comes back as its message, not as an exception: DataLoader would wrap a worker's exception
    in the worker's traceback, and the user gets one line."""

    def __init__(self, paths: np.ndarray, channels: int, size: tuple[int, int]):
        self.paths, self.channels, self.size = paths, channels, size

    def __getitem__(self, positions: np.ndarray) -> Tensor | str:
        try:
            return decode_files(self.paths[positions], self.channels, self.size)
        except DataError as e:
            return str(e)


class _Order(torch.utils.data.Sampler):
    """The index batches of the current epoch; set before each pass. It lives in the main process (workers
    only receive the batches), so one persistent DataLoader serves every epoch."""

    def __init__(self) -> None:
        self.batches: list[np.ndarray] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class FileImages:
    """A lazily decoded image set: file paths plus how to decode them."""

    def __init__(self, paths: list[str] | np.ndarray, channels: int, size: tuple[int, int], workers: int):
        self.paths = np.asarray(paths, dtype=object)
        self.channels, self.size, self.workers = channels, tuple(size), workers
        self._order, self._loader = _Order(), None

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.paths), self.channels, *self.size)

    @property
    def ndim(self) -> int:
        return 4

    def subset(self, index) -> FileImages:
        """The files at `index` (array of positions or a slice), still on disk."""
        return FileImages(self.paths[index], self.channels, self.size, self.workers)

    def __getitem__(self, index) -> Tensor:
        if isinstance(index, Tensor):
            index = index.cpu().numpy()
        if isinstance(index, (int, np.integer)):
            return decode_files([self.paths[index]], self.channels, self.size)[0]
        return decode_files(self.paths[index], self.channels, self.size)

    def to(self, *args, **kwargs) -> FileImages:
        """Stays on disk; each decoded batch is moved where it is needed."""
        return self

    def _loader_for(self, order: _Order, persistent: bool):
        # Its own generator: a DataLoader draws a worker seed from the global RNG otherwise, which would
        # shift the training noise (augmentation, z draws) away from the in-memory run's.
        return torch.utils.data.DataLoader(
            _Decode(self.paths, self.channels, self.size), sampler=order, batch_size=None,
            num_workers=self.workers, prefetch_factor=4 if self.workers else None,
            persistent_workers=persistent and self.workers > 0, generator=torch.Generator().manual_seed(0))

    @staticmethod
    def _checked(loader):
        for item in loader:
            if isinstance(item, str):
                raise DataError(item)
            yield item

    def batches(self, index_batches: list[np.ndarray]):
        """Decoded batches in the given order, `workers` processes decoding ahead of the consumer. The
        workers persist from one call to the next (no process start-up per epoch) until `close()`."""
        if self._loader is None:
            self._loader = self._loader_for(self._order, persistent=True)
        self._order.batches = list(index_batches)
        yield from self._checked(self._loader)

    def close(self) -> None:
        """Stop the persistent workers now (left to garbage collection, their shutdown can stall)."""
        it = getattr(self._loader, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        self._loader = None

    def split(self, n: int):
        """Like Tensor.split: consecutive decoded batches of n images (a one-off pass: its workers end
        with it)."""
        order = _Order()
        order.batches = [np.arange(s, min(s + n, len(self))) for s in range(0, len(self), n)]
        yield from self._checked(self._loader_for(order, persistent=False))


def is_lazy(x) -> bool:
    return isinstance(x, FileImages)
