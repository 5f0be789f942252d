"""Sharing the cores between vae jobs (core/peers.py): real processes holding real lock files, killed for
real; the budget they lead to in cpu.detect, in torch, and in a running training."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from vae_cli.core import cpu, peers

from .conftest import ROOT, TINY

HOLD = ("import os, sys, time; from pathlib import Path; from vae_cli.core import peers; "
        "cpus = frozenset(int(c) for c in sys.argv[2].split(',')) if len(sys.argv) > 2 else peers.my_cpus(); "
        "peers.Registration(Path(sys.argv[1]), peers.Peer(os.getpid(), peers.my_group(), time.time(), cpus)); "
        "print('ready', flush=True); time.sleep(120)")


def hold(folder, cpus: str | None = None) -> subprocess.Popen:
    """A live peer: another process announcing itself in `folder` until it is killed."""
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(folder), *([cpus] if cpus else [])], cwd=ROOT,
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    return p


def me(started: float = 0.0, group: str | None = None) -> peers.Peer:
    return peers.Peer(os.getpid(), group or peers.my_group(), started, peers.my_cpus())


needs_two = pytest.mark.skipif(cpu.affinity_cores() < 2, reason="needs 2 cores to share")


@pytest.mark.parametrize("cores, place, env, expected", [
    (2, (0, 1), {}, 2),
    (2, (0, 2), {}, 1),
    (2, (2, 3), {}, 1),  # three jobs on two cores: one thread each, never zero
    (3, (0, 2), {}, 2),  # the remainder goes to the job that started first
    (3, (1, 2), {}, 1),
    (16, (1, 2), {"LOCAL_WORLD_SIZE": "4"}, 2),  # the job's half split between its 4 ranks
    (16, (1, 4), {"VAE_THREADS": "6"}, 6),  # the user's number is not shared
])
def test_detect_takes_its_share(cores, place, env, expected):
    b = cpu.detect(env=env, affinity=cores, quota=None, place=place)
    assert b.cores == expected
    assert ("shared with" in b.source) == (place[1] > 1 and "VAE_THREADS" not in env)


def test_place_orders_jobs_by_start_and_groups_ranks():
    a = peers.Peer(1, "pid:1", 10.0, frozenset({0}))
    r0 = peers.Peer(2, "torchrun:x", 5.0, frozenset({0}))
    r1 = peers.Peer(3, "torchrun:x", 7.0, frozenset({0}))
    mine = peers.Peer(4, "pid:4", 20.0, frozenset({0}))
    assert peers.place(mine, [a, r0, r1]) == (2, 3)  # two ranks of one torchrun job count once
    assert peers.place(a, [mine, r0, r1]) == (1, 3)
    assert peers.place(mine, []) == (0, 1)


def test_live_peers_dead_ones_removed_and_other_cores_ignored(tmp_path):
    mine = me()
    alive = hold(tmp_path)
    elsewhere = hold(tmp_path, "999")  # pinned to CPUs this process does not have: not a competitor
    try:
        assert [p.pid for p in peers.live_peers(tmp_path, mine)] == [alive.pid]
        (tmp_path / "junk.lock").write_text("not json")  # unlocked: treated as a dead peer's file
        alive.send_signal(signal.SIGKILL)  # no clean-up of its own: the kernel drops the lock
        alive.wait()
        assert peers.live_peers(tmp_path, mine) == []
        assert not (tmp_path / f"{alive.pid}.lock").exists() and not (tmp_path / "junk.lock").exists()
        assert (tmp_path / f"{elsewhere.pid}.lock").exists()
    finally:
        for p in (alive, elsewhere):
            p.kill()
            p.wait()


def test_registration_is_withdrawn_and_the_folder_is_configurable(tmp_path):
    reg = peers.Registration(tmp_path / "share", me(time.time()))
    assert json.loads((tmp_path / "share" / f"{os.getpid()}.lock").read_text())["pid"] == os.getpid()
    assert oct((tmp_path / "share").stat().st_mode & 0o777) == "0o700"
    reg.close()
    assert list((tmp_path / "share").iterdir()) == []
    assert peers.share_dir({"VAE_CPU_SHARE": "off"}) is None
    assert peers.share_dir({"VAE_CPU_SHARE": str(tmp_path)}) == tmp_path
    assert peers.share_dir({"XDG_RUNTIME_DIR": "/run/user/7"}).as_posix() == "/run/user/7/vae-cpu"


def test_an_unusable_folder_means_alone_and_says_so(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv("VAE_CPU_SHARE", str(blocker / "sub"))  # below a file: cannot be created
    monkeypatch.setattr(peers, "SHARING", peers.Sharing())
    b = cpu.current()
    assert b.cores == cpu.detect().cores and "not shared: cannot use" in b.source


@needs_two
def test_budget_shrinks_and_grows_back_in_torch(tmp_path, monkeypatch):
    import torch

    from vae_cli.core import runtime

    monkeypatch.setenv("VAE_CPU_SHARE", str(tmp_path))
    monkeypatch.setattr(peers, "SHARING", peers.Sharing())
    before = torch.get_num_threads()
    alone = cpu.detect().cores
    try:
        assert runtime.cpu_budget().cores == alone and torch.get_num_threads() == alone
        other = hold(tmp_path)
        assert runtime.recheck_cpu_budget(every=3600) is None  # asked a moment ago: not again yet
        changed = runtime.recheck_cpu_budget(every=0)
        assert changed is not None and changed.cores == alone // 2 and torch.get_num_threads() == alone // 2
        other.kill()
        other.wait()
        changed = runtime.recheck_cpu_budget(every=0)
        assert changed is not None and changed.cores == alone and torch.get_num_threads() == alone
    finally:
        peers.SHARING.close()
        runtime.apply_cpu_budget(cpu.CpuBudget(before, "restored"))


def _train(tmp_path, *extra, **popen):
    env = {**os.environ, "VAE_CPU_SHARE": str(tmp_path / "share")}
    env.pop("VAE_THREADS", None)
    return subprocess.Popen([sys.executable, "-m", "vae_cli", "train", *extra, "--out", str(tmp_path / "runs"),
                             "--json", "--device", "cpu"], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


@needs_two
def test_a_training_started_beside_another_job_takes_half(tmp_path):
    (tmp_path / "share").mkdir()
    other = hold(tmp_path / "share")
    try:
        out, err = _train(tmp_path, str(TINY), "epochs=1").communicate(timeout=300)
    finally:
        other.kill()
        other.wait()
    result = json.loads(out)
    assert result["cpu"]["threads"] == cpu.affinity_cores() // 2, err[-2000:]
    assert "shared with 1 other vae job" in result["cpu"]["source"] and "shared with 1 other vae job" in err


@needs_two
def test_a_running_training_shrinks_when_a_second_job_starts(tmp_path):
    share = tmp_path / "share"
    train = _train(tmp_path, str(ROOT / "recipes" / "digits.yaml"), "epochs=15", "data.holdout_fraction=0")
    try:
        first = train.stderr.readline()  # its first line: it runs, with the threads it took alone
        assert first.startswith("training ") and f"{cpu.affinity_cores()} threads" in first, first
        assert (share / f"{train.pid}.lock").exists()  # it has announced itself
        other = hold(share)
        out, err = train.communicate(timeout=600)
        other.kill()
        other.wait()
    finally:
        train.kill()
    assert train.returncode == 0, err[-2000:]
    assert f"cpu: now {cpu.affinity_cores() // 2} thread" in err, err[-3000:]
    assert not (share / f"{train.pid}.lock").exists()  # withdrawn at exit
