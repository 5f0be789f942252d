from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")
# the suite's vae processes share cores among themselves only, not with a training running beside the suite
# (which would change their thread counts mid-test)
os.environ["VAE_CPU_SHARE"] = tempfile.mkdtemp(prefix="vae-cpu-test-")

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny.yaml"


@pytest.fixture(scope="session")
def runner():
    from typer.testing import CliRunner

    return CliRunner()


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, runner):
    """One tiny model trained through the CLI, shared by the tests that only read it."""
    from vae_cli.cli import app

    out = tmp_path_factory.mktemp("runs")
    res = runner.invoke(app, ["train", str(TINY), "--out", str(out), "--device", "cpu", "--json", "--quiet"])
    assert res.exit_code == 0, res.output
    return out / "tiny"


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory, runner):
    """The demo recipe, shortened to 15 epochs (~5 s): a model good enough that its pictures show digits
    and its likelihood tells digits from noise. Shared by the picture and rejection tests."""
    from vae_cli.cli import app

    out = tmp_path_factory.mktemp("runs")
    res = runner.invoke(app, ["train", str(ROOT / "recipes" / "digits.yaml"), "--out", str(out), "--device", "cpu",
                              "--json", "--quiet", "epochs=15"])
    assert res.exit_code == 0, res.output
    return out / "digits"
