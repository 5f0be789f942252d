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


# --- a sharing folder someone else prepared (issue 30): never followed, never trusted, never hanging -----------
def _register_in(folder) -> tuple[peers.Sharing, str]:
    import contextlib
    import io

    s = peers.Sharing()
    buf = io.StringIO()
    with contextlib.redirect_stderr(buf), pytest.MonkeyPatch.context() as mp:
        mp.setenv(peers.ENV, str(folder))
        s.register()
    s.close()
    return s, buf.getvalue()


def test_a_planted_symlink_folder_is_not_followed(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir(mode=0o700)
    (victim / "123.lock").write_text("someone's file")  # a dead lock file would be removed if followed
    (tmp_path / "share").symlink_to(victim)
    s, said = _register_in(tmp_path / "share")
    assert s.registration is None and "symbolic link" in s.problem
    assert said.count("\n") == 1 and "not shared" in said
    assert _files_of(victim) == {"123.lock"}


def test_a_world_writable_folder_is_not_used(tmp_path):
    shared = tmp_path / "share"
    shared.mkdir()
    shared.chmod(0o777)
    (shared / "9.lock").write_text("x")
    s, _ = _register_in(shared)
    assert s.registration is None and "written by other users" in s.problem
    assert _files_of(shared) == {"9.lock"}


def test_a_new_folder_is_private(tmp_path):
    s, said = _register_in(tmp_path / "fresh" / "share")
    assert s.problem is None and said == ""
    assert stat_mode(tmp_path / "fresh" / "share") == 0o700


def test_fifos_and_junk_locks_neither_hang_nor_crash_and_stay(tmp_path):
    folder = tmp_path / "share"
    folder.mkdir(mode=0o700)
    os.mkfifo(folder / "1.lock")
    (folder / "2.lock").mkdir()
    (folder / "3.lock").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "elsewhere").write_text("{}")
    for i, junk in enumerate([b"[" * 3000 + b"]" * 3000, b'{"pid": 1e999}', b"x" * 10_000,
                              b'{"pid": 5, "group": "g", "started": NaN, "cpus": [0]}']):
        held = _hold_bytes(folder / f"{10 + i}.lock", junk)
        assert held.stdout.readline().strip() == "ready"
    t0 = time.monotonic()
    assert peers.live_peers(folder, me()) == []  # junk is nobody
    assert time.monotonic() - t0 < 10
    assert {"1.lock", "2.lock", "3.lock"} <= _files_of(folder)
    assert (tmp_path / "elsewhere").read_text() == "{}"


def test_parse_peer_takes_only_what_registration_writes():
    good = {"pid": 5, "group": "pid:5", "started": 1.5, "cpus": [0, 1]}
    assert peers.parse_peer(json.dumps(good).encode()) == peers.Peer(5, "pid:5", 1.5, frozenset({0, 1}))
    for bad in ({**good, "pid": 1e999}, {**good, "pid": True}, {**good, "cpus": [[0]]}, {**good, "cpus": "01"},
                [good], {**good, "started": "x"}):
        assert peers.parse_peer(json.dumps(bad).encode()) is None


def test_a_run_refused_by_the_run_lock_is_never_a_peer(tmp_path):
    folder = tmp_path / "share"
    out = tmp_path / "runs"
    env = {**os.environ, peers.ENV: str(folder)}
    from vae_cli.engine.runlock import RunLock

    (out / "tiny").mkdir(parents=True)
    with RunLock(out / "tiny"):
        res = subprocess.run([sys.executable, "-m", "vae_cli", "train", str(TINY), "--out", str(out), "--resume"],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 75, res.stderr
    assert not folder.exists() or not any(p.suffix == ".lock" for p in folder.iterdir())


HOLD_BYTES = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_CREAT | os.O_WRONLY, 0o600); "
              "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, bytes.fromhex(sys.argv[2])); print('ready', flush=True); "
              "time.sleep(60)")
_held: list = []


def _hold_bytes(path, content: bytes) -> subprocess.Popen:
    """A live process holding a lock file with arbitrary content (killed at exit)."""
    p = subprocess.Popen([sys.executable, "-c", HOLD_BYTES, str(path), content.hex()], stdout=subprocess.PIPE,
                         text=True)
    _held.append(p)
    return p


@pytest.fixture(autouse=True)
def _kill_held():
    yield
    while _held:
        p = _held.pop()
        p.kill()
        p.wait()


def _files_of(folder) -> set[str]:
    return {p.name for p in folder.iterdir()}


def stat_mode(path) -> int:
    import stat as st

    return st.S_IMODE(os.lstat(path).st_mode)
