"""Weights that do not depend on the cores a run gets (issue 30, engine/shards.py): the random draws of a
thread, shards run side by side or one after another, and real trainings alone, beside another vae job that
starts and stops, and killed with -9 and resumed while other jobs come and go."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import torch
from safetensors.torch import load_file
from torch import nn

from tests.test_peers import hold, needs_two
from tests.test_photos import PHOTO, photos  # noqa: F401  (the fixture)
from vae_cli.core import rng
from vae_cli.core.runtime import Runtime
from vae_cli.engine.shards import Shards, auto_count, shard_seed, split

from .conftest import ROOT


def _same(a, b) -> list[str]:
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    return [k for k in ta if not torch.equal(ta[k], tb[k])]


# --- the parts ---------------------------------------------------------------------------------------------------
def test_thread_generators_make_concurrent_draws_reproducible():
    def draws(seed):
        with rng.using(torch.Generator().manual_seed(seed)):
            out = []
            for _ in range(200):
                out.append(rng.randn_like(torch.empty(64)))
                out.append(rng.randint(0, 10, (16,)))
                out.append(rng.bernoulli(torch.full((32,), 0.5)))
            return torch.cat([t.float() for t in out])

    alone = [draws(s) for s in (1, 2)]
    got: dict = {}
    threads = [threading.Thread(target=lambda s=s: got.update({s: draws(s)})) for s in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert torch.equal(got[1], alone[0]) and torch.equal(got[2], alone[1])
    assert not torch.equal(alone[0], alone[1])
    assert rng.current() is None  # outside `using`, the global generator as before


def test_global_draws_take_the_threads_generator_and_leave_the_global_one():
    torch.manual_seed(5)
    before = torch.get_rng_state()
    gen = torch.Generator().manual_seed(9)
    with rng.using(gen), rng.global_draws():
        a = torch.rand(4)  # third-party code drawing from the global generator
    assert torch.equal(a, torch.rand(4, generator=torch.Generator().manual_seed(9)))
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(torch.rand(4, generator=gen), torch.rand(8, generator=torch.Generator().manual_seed(9))[4:])


def test_dropout_masks_follow_the_generator():
    d = rng.Dropout(0.5).train()
    x = torch.ones(1000)
    with rng.using(torch.Generator().manual_seed(0)):
        a = d(x)
    with rng.using(torch.Generator().manual_seed(0)):
        b = d(x)
    assert torch.equal(a, b) and set(a.unique().tolist()) == {0.0, 2.0}
    assert torch.equal(d.eval()(x), x)


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Dropout(0.0),
                         nn.Conv2d(16, 16, 3, padding=1), nn.Flatten(), nn.Linear(16 * 8 * 8, 4))


def _sharded_grads(concurrency: int, main_threads: int):
    torch.set_num_threads(main_threads)
    net = _net()
    shards = Shards(net, 3, seed=7)
    x = torch.randn(48, 3, 8, 8)

    def fn(model, part):
        noise = rng.randn_like(part) * 0.1  # a draw inside the shard
        model(part + noise).pow(2).mean().backward()
        return len(part)

    try:
        sizes = shards.run(step=4, fn=fn, parts=split(x, 3), concurrency=concurrency)
        shards.reduce()
    finally:
        shards.close()
    return sizes, [p.grad.clone() for p in net.parameters()], [b.clone() for b in net.buffers()]


def test_shards_side_by_side_or_one_after_another_give_the_same_bits():
    threads = torch.get_num_threads()
    try:
        sizes, g1, b1 = _sharded_grads(concurrency=1, main_threads=1)
        _, g3, b3 = _sharded_grads(concurrency=3, main_threads=2)
    finally:
        torch.set_num_threads(threads)
    assert sizes == [16, 16, 16]
    assert all(torch.equal(a, b) for a, b in zip(g1, g3))
    assert all(torch.equal(a, b) for a, b in zip(b1, b3))  # the model keeps shard 0's batch-norm statistics


def test_the_reduced_gradient_is_the_mean_of_the_shards():
    net = nn.Linear(3, 1, bias=False)
    shards = Shards(net, 2, seed=0)
    parts = [torch.ones(2, 3), 3 * torch.ones(2, 3)]
    try:
        shards.run(0, lambda m, p: m(p).sum().backward(), parts, 2)
        shards.reduce()
    finally:
        shards.close()
    assert torch.allclose(net.weight.grad, torch.full((1, 3), (2.0 + 6.0) / 2))


def test_shard_count_and_seeds():
    assert auto_count(2, 64) == 2 and auto_count(16, 448) == 8 and auto_count(4, 40) == 1 and auto_count(1, 512) == 1
    assert auto_count(2, 64, 64) == 1 and auto_count(2, 64, 3 * 32 * 32) == 2  # 8x8 digits: one; photos: two
    assert shard_seed(0, 1, 0) != shard_seed(0, 1, 1) != shard_seed(0, 2, 0)
    assert shard_seed(3, 10, 1) == shard_seed(3, 10, 1)


# --- real trainings ----------------------------------------------------------------------------------------------
DIGITS = [sys.executable, "-m", "vae_cli", "train", "recipes/digits.yaml", "epochs=6", "train.checkpoint_every=10",
          "train.shards=2",  # two shards: side by side alone, one after another beside a peer
          "--device", "cpu", "--quiet"]


def _train(out, name, share, *extra, **env):
    return subprocess.Popen([*DIGITS, "--out", str(out), "--name", name, *extra], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "VAE_CPU_SHARE": str(share), **env})


def _alone_then_a_shared_folder(tmp_path):
    """The reference training, alone in its own CPU-sharing folder; then the folder the compared run shares."""
    alone = _train(tmp_path, "alone", tmp_path / "share-a")
    assert alone.wait(timeout=600) == 0, alone.stderr.read()
    share = tmp_path / "share-b"
    share.mkdir(mode=0o700)
    return share


@needs_two
def test_weights_do_not_depend_on_other_jobs_starting_and_stopping(tmp_path):
    share = _alone_then_a_shared_folder(tmp_path)
    beside = _train(tmp_path, "beside", share)
    others = []
    for _ in range(3):  # jobs come and go during the run: its thread count changes several times
        time.sleep(1.5)
        others.append(hold(share))
        time.sleep(1.5)
        others.pop().kill()
    assert beside.wait(timeout=600) == 0, beside.stderr.read()
    assert _same(tmp_path / "alone" / "model.safetensors", tmp_path / "beside" / "model.safetensors") == []


@needs_two
def test_kill_9_and_resume_while_jobs_come_and_go_is_bit_identical(tmp_path):
    share = _alone_then_a_shared_folder(tmp_path)
    run = tmp_path / "cut"
    for i in range(2):
        other = hold(share) if i == 0 else None  # killed beside a job, resumed alone, killed again, ...
        proc = _train(tmp_path, "cut", share, *(["--resume"] if run.exists() else []))
        deadline = time.monotonic() + 120
        while not (run / "last.safetensors").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0 + i)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        if other is not None:
            other.kill()
    last = hold(share)  # the resumed run ends beside another job
    try:
        again = _train(tmp_path, "cut", share, "--resume")
        assert again.wait(timeout=600) == 0, again.stderr.read()
    finally:
        last.kill()
    assert _same(tmp_path / "alone" / "model.safetensors", run / "model.safetensors") == []


def test_photo_m2_with_kornia_and_batch_norm_is_the_same_on_one_or_two_threads(tmp_path, photos):  # noqa: F811
    """The photo recipes' step (kornia strong view, batch norm, the decoder used for several classes) under bf16
    autocast: two shards one after another (1 thread) and side by side (2 threads) give the same bits.
    Side by side, autocast's shared weight cache made the gradients differ from run to run (26 of 57 tensors)."""
    root, _ = photos
    runs = {}
    for name, threads in (("a", "1"), ("b", "2")):
        res = subprocess.run([sys.executable, "-m", "vae_cli", "train", "recipes/tiny.yaml", *PHOTO,
                              f"data.root={root}", "epochs=2", "train.shards=2", "--out", str(tmp_path), "--name",
                              name, "--device", "cpu", "--precision", "bf16", "--quiet"], cwd=ROOT,
                             capture_output=True, text=True, timeout=600,
                             env={**os.environ, "VAE_THREADS": threads, "VAE_CPU_SHARE": "off"})
        assert res.returncode == 0, res.stderr
        runs[name] = tmp_path / name / "model.safetensors"
    assert _same(runs["a"], runs["b"]) == []


def _twice_used_weight_grad(cache: bool, other_thread_leaves_autocast: bool) -> torch.Tensor:
    torch.manual_seed(0)
    lin, x = nn.Linear(64, 64), torch.randn(32, 64)
    with Runtime(torch.device("cpu"), "bf16").autocast(cache=cache):
        h = torch.tanh(lin(x))
        if other_thread_leaves_autocast:  # what a shard finishing its forward does while this one runs
            def other() -> None:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    pass
            t = threading.Thread(target=other)
            t.start()
            t.join()
        out = lin(h)
    out.float().pow(2).sum().backward()
    return lin.weight.grad


def test_the_shards_autocast_does_not_depend_on_other_threads():
    """core/runtime.py: without autocast's weight cache, another thread leaving autocast mid-forward changes
    nothing (with it, on torch 2.x, the weight used twice gets a different gradient)."""
    assert torch.equal(_twice_used_weight_grad(False, False), _twice_used_weight_grad(False, True))


def test_the_shard_count_is_kept_by_a_resumed_run(tmp_path):
    from vae_cli.engine import state

    res = subprocess.run([*DIGITS, "epochs=1", "train.shards=3", "--out", str(tmp_path), "--name", "s"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    _, meta = state.load(tmp_path / "s" / "last.safetensors")
    assert meta["progress"]["shards"] == 3


def test_unlabelled_elbo_images_is_a_per_step_count_across_shards():
    from vae_cli.core.recipe import ModelConfig
    from vae_cli.models import build_model
    from vae_cli.models.base import Batch

    cfg = ModelConfig(name="m2", latent_dim=4, hidden=16, unlabelled_elbo_images=8, consistency=0.0)
    model = build_model(cfg, (1, 8, 8), 3)
    seen = []
    model.unlabelled_bound = lambda x, h, q, kl, share: (seen.append(len(x)), (torch.zeros(len(x)),) * 3)[1]
    x = torch.rand(16, 1, 8, 8)
    y = torch.randint(0, 3, (16,))
    lab = torch.zeros(16, dtype=torch.bool)
    for share in (1.0, 0.5, 0.25):
        model.loss(Batch(x, y, lab, x[:4], y[:4], share=share), 1.0)
    assert seen == [8, 4, 2]


def test_every_worker_thread_starts_with_the_shards_and_keeps_its_shard():
    """No worker starts (and sets its thread count, which empties oneDNN's cache) while a shard computes, and
    each shard runs on its own worker."""
    before = {t.name for t in threading.enumerate()}
    shards = Shards(nn.Linear(2, 2), 3, seed=0)
    try:
        started = {t.name for t in threading.enumerate()} - before
        assert len([n for n in started if n.startswith("vae-shard")]) == 3
        # shard i runs on worker i, whatever the concurrency; the reductions on worker 0
        for concurrency in (1, 3):
            names = shards.run(0, lambda m, p: threading.current_thread().name, [None] * 3, concurrency)
            assert [n.split("_")[0] for n in names] == ["vae-shard0", "vae-shard1", "vae-shard2"]
        assert shards.call(lambda: threading.current_thread().name).split("_")[0] == "vae-shard0"
    finally:
        shards.close()
