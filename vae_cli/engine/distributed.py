"""Many processes under `torchrun`: DistributedDataParallel with gloo on CPU and nccl on GPU.

`torchrun --nproc-per-node N -m vae_cli train RECIPE` sets WORLD_SIZE/RANK/LOCAL_RANK; `setup()` then
joins the process group. The recipe means the same job at any process count: `train.batch_size` is the
*global* batch, split evenly across ranks, so the learning rate needs no rescaling. Every rank draws the
same epoch order from the seeded generator and takes its own interleaved share of each batch. Only rank
0 writes files. Nothing here pickles: paths and RNG states travel as uint8 tensors.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from vae_cli.core.errors import UsageError

PATH_BYTES = 4096


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, idx: torch.Tensor) -> torch.Tensor:
        """This rank's share of a global batch of indices."""
        return idx[self.rank::self.world] if self.enabled else idx

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def max_(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t

    def gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        if not self.enabled:
            return [t]
        out = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(out, t)
        return out

    def share_path(self, path: Path | None, device: torch.device) -> Path:
        """Rank 0's path, known to every rank (as fixed-size UTF-8 bytes, no pickle)."""
        if not self.enabled:
            assert path is not None
            return path
        buf = torch.zeros(PATH_BYTES, dtype=torch.uint8, device=device)
        if self.is_main:
            raw = str(path).encode()
            if len(raw) > PATH_BYTES:
                raise UsageError(f"run folder path is longer than {PATH_BYTES} bytes; use a shorter --out")
            buf[: len(raw)] = torch.tensor(list(raw), dtype=torch.uint8)
        dist.broadcast(buf, src=0)
        return Path(bytes(buf.cpu().tolist()).rstrip(b"\0").decode())

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def setup(device: str) -> Dist:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); a no-op otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Dist(rank, world, local_rank)


def teardown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()


def checksum(model: torch.nn.Module) -> int:
    """A fingerprint of the bit patterns of every float parameter and buffer: equal across ranks when
    they hold identical weights, and different for any one-bit difference in practice."""
    total = torch.zeros((), dtype=torch.int64)
    for i, t in enumerate(model.state_dict().values()):
        if t.dtype == torch.float32:
            bits = t.detach().cpu().contiguous().view(torch.int32).long().flatten()
            total += (bits * torch.arange(1, bits.numel() + 1) * (i + 1)).sum()
    return int(total)
