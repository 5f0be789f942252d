"""Does a sharded training step give the same bits every time? (issue #30's remaining race)

The recipe's model, one batch, one step number and seed: the step's shards (engine/shards.py) run side by side
again and again for SECONDS, each time the per-replica gradients hashed and compared with the first run's. Run
it beside other load (`nice`, `taskset -c 0`) to see whether preemption changes a number; run it under
`MALLOC_PERTURB_=N` for several N to see whether a kernel reads memory it did not write (the first digest
changes with N then).

    python scripts/shard_stress.py [--recipe recipes/digits.yaml] [--precision auto] [--shards 2] SECONDS
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from vae_cli.core.recipe import load  # noqa: E402
from vae_cli.core.runtime import resolve  # noqa: E402
from vae_cli.data import build_dataset  # noqa: E402
from vae_cli.engine.shards import Shards, split  # noqa: E402
from vae_cli.models import build_model  # noqa: E402
from vae_cli.models.base import Batch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("seconds", type=float)
    ap.add_argument("--recipe", default="recipes/digits.yaml")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--shards", type=int, default=2)
    args = ap.parse_args()

    recipe = load(args.recipe)
    rt = resolve("cpu", args.precision, budget=False)
    torch.set_num_threads(1)  # the main thread only hands out the shards, as in training
    data = build_dataset(recipe.data, recipe.seed, read_only=True)
    torch.manual_seed(recipe.seed)
    model = build_model(recipe.model, data.image_shape, len(data.classes)).train()
    shards = Shards(model, args.shards, seed=recipe.seed)
    n = recipe.train.batch_size
    x, y = data.train_x[:n].float(), data.train_y[:n]
    labelled = torch.zeros(len(x), dtype=torch.bool)
    parts = list(zip(split(x, args.shards), split(y, args.shards), split(labelled, args.shards)))

    def shard(net, part):
        xs, ys, ls = part
        with rt.autocast(cache=False):
            terms = net(Batch(xs, ys, ls, xs[:0], ys[:0], strong=None, share=1.0 / args.shards), torch.tensor(1.0))
        terms["loss"].backward()

    def digest() -> tuple[str, ...]:
        shards.run(3, shard, parts, args.shards)
        return tuple(hashlib.blake2b(p.grad.numpy().tobytes(), digest_size=8).hexdigest()
                     for rep in shards.replicas for p in rep.parameters() if p.grad is not None)

    try:
        first = digest()
        print(f"first digest {hashlib.md5(repr(first).encode()).hexdigest()[:12]} ({rt.precision}, "
              f"{args.shards} shards)", flush=True)
        runs = differed = 0
        end = time.monotonic() + args.seconds
        while time.monotonic() < end:
            got, runs = digest(), runs + 1
            if got != first:
                differed += 1
                print(f"step {runs}: {sum(a != b for a, b in zip(got, first))} of {len(got)} gradients differ",
                      flush=True)
        print(f"{runs} repeats, {differed} differed")
    finally:
        shards.close()


if __name__ == "__main__":
    main()
