"""The CPU budget: affinity, cgroup v1/v2 quotas (fake files), --threads / VAE_THREADS, torchrun ranks,
and the threads torch actually gets."""

from __future__ import annotations

import subprocess
import sys

import pytest

from vae_cli.core import cpu
from vae_cli.core.errors import UsageError

from .conftest import ROOT, TINY


def _v2(tmp_path, rel: str, files: dict[str, str]):
    root = tmp_path / "cg"
    for where, text in files.items():
        (root / where).mkdir(parents=True, exist_ok=True)
        (root / where / "cpu.max").write_text(text)
    me = tmp_path / "self"
    me.write_text(f"0::{rel}\n")
    return root, me


@pytest.mark.parametrize("files, expected", [
    ({".": "max 100000"}, None),
    ({".": "150000 100000"}, 1.5),
    ({".": "max 100000", "a": "400000 100000", "a/b": "200000 100000"}, 2.0),  # the tightest along the path
    ({"a": "50000 100000", "a/b": "max 100000"}, 0.5),
    ({".": "garbage"}, None),
])
def test_cgroup_v2_quota(tmp_path, files, expected):
    root, me = _v2(tmp_path, "/a/b", files)
    assert cpu.cgroup_quota(root, me) == expected


@pytest.mark.parametrize("quota, period, expected", [("-1", "100000", None), ("50000", "100000", 0.5),
                                                     ("300000", "100000", 3.0), ("x", "100000", None)])
def test_cgroup_v1_quota(tmp_path, quota, period, expected):
    mount = tmp_path / "cg" / "cpu,cpuacct"  # a container: the mount is its own cgroup, the path is the host's
    mount.mkdir(parents=True)
    (mount / "cpu.cfs_quota_us").write_text(quota)
    (mount / "cpu.cfs_period_us").write_text(period)
    me = tmp_path / "self"
    me.write_text("12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n")
    assert cpu.cgroup_quota(tmp_path / "cg", me) == expected


def test_no_cgroup_file_means_no_quota(tmp_path):
    assert cpu.cgroup_quota(tmp_path, tmp_path / "missing") is None


@pytest.mark.parametrize("affinity, quota, env, cores", [
    (16, None, {}, 16),
    (16, 1.5, {}, 2),  # a container with --cpus 1.5 on a 16-core host: 2 threads, not 16
    (16, 0.2, {}, 1),
    (3, 8.0, {}, 3),  # the affinity mask is tighter than the quota
    (16, None, {"LOCAL_WORLD_SIZE": "4"}, 4),  # torchrun: four ranks share the machine
    (16, 2.0, {"VAE_THREADS": "5"}, 5),  # the user knows best
])
def test_budget(affinity, quota, env, cores):
    b = cpu.detect(env=env, affinity=affinity, quota=quota)
    assert b.cores == cores and b.intra_op == cores
    assert 1 <= b.loader_workers <= 4 and 1 <= b.decode_threads <= 8 and b.inter_op in (1, 2)
    if quota is not None and quota < affinity and not env:
        assert "quota" in b.source


def test_threads_option_wins_and_bad_values_are_one_line():
    assert cpu.detect(threads=3, env={"VAE_THREADS": "7"}, affinity=2, quota=None).cores == 3
    for bad in ("0", "-2", "many", "99999"):
        with pytest.raises(UsageError, match="VAE_THREADS"):
            cpu.detect(env={"VAE_THREADS": bad}, affinity=2, quota=None)


def test_threads_reach_torch_in_a_real_process(tmp_path):
    """`vae --threads 1 train` runs torch with one thread and says so (first log line, --json)."""
    code = ("import json, sys, torch; from vae_cli.cli.main import main; sys.argv = ['vae', '--threads', '1', "
            f"'train', {str(TINY)!r}, '--out', {str(tmp_path)!r}, '--json', '--device', 'cpu', 'epochs=1'];\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\nprint('TORCH_THREADS', torch.get_num_threads(), "
            "file=sys.stderr)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert "TORCH_THREADS 1" in out.stderr, out.stderr[-2000:]
    assert "1 thread (VAE_THREADS or --threads)" in out.stderr
    import json

    assert json.loads(out.stdout)["cpu"]["threads"] == 1


def test_bad_threads_option_is_one_line(runner):
    from vae_cli.cli import app

    res = runner.invoke(app, ["--threads", "zero", "info", "--models"])
    assert res.exit_code == 2 and res.stderr.strip().startswith("error: --threads must be")
