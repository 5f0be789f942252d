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


# `make test-fast` (pytest -m "not slow"): the pure functions and the models' maths. Slow: a test that starts
# processes or trains through the CLI, i.e. one in these modules or using one of these fixtures.
SLOW_MODULES = {"test_resilience", "test_shards", "test_distributed", "test_device_check", "test_outputs", "test_hvae",
                "test_train", "test_photos", "test_peers", "test_warmstart", "test_calibrate", "test_embed_api",
                "test_hardening", "test_cpu", "test_grey_few_labels", "test_rotation", "test_streaming",
                "test_recipes_completion", "test_trackers", "test_export", "test_pictures", "test_reject",
                "test_reject_scores", "test_fuzz_files", "test_bad_input", "test_cli", "test_device"}
SLOW_FIXTURES = {"tiny_run", "digits_run", "runner", "photos"}


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: starts processes or trains (left out by `make test-fast`)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1]
        if module in SLOW_MODULES or SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
