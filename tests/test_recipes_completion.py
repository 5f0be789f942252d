"""Shipped recipes by name from any folder, `vae info --recipes`, and shell completion of recipe names,
keys and values through the console script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from vae_cli.cli import app
from vae_cli.core import builtin


def test_every_shipped_recipe_is_listed_and_loads():
    from vae_cli.core.recipe import load

    names = builtin.names()
    assert {"digits", "tiny", "mnist-100-labels", "cifar10-4000-labels", "folder-example"} <= set(names)
    for n in names:
        r = load(n)  # by name: the packaged file
        assert r.name and builtin.summary(n), n  # each opens with a line saying what it is


def test_train_by_name_from_another_folder(tmp_path, runner, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no recipes/ here: the packaged one is used
    res = runner.invoke(app, ["train", "tiny", "epochs=1", "--quiet", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["run_dir"] == str(Path("runs") / "tiny")
    assert (tmp_path / "runs" / "tiny" / "model.safetensors").is_file()


def test_a_file_wins_over_a_shipped_name(tmp_path, runner, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").write_text((builtin.RECIPES / "tiny.yaml").read_text().replace("name: tiny", "name: mine"))
    res = runner.invoke(app, ["train", "tiny", "epochs=1", "--quiet", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["run_dir"].endswith("mine")


def test_unknown_recipe_names_the_shipped_ones(runner):
    res = runner.invoke(app, ["train", "digitz"])
    assert res.exit_code == 2
    line = res.stderr.strip()
    assert "'digitz' not found" in line and "digits" in line and "cifar10-4000-labels" in line


def test_info_recipes(runner):
    res = runner.invoke(app, ["info", "--recipes"])
    assert res.exit_code == 0
    assert [line.split()[0] for line in res.stdout.splitlines()] == builtin.names()
    data = json.loads(runner.invoke(app, ["info", "--recipes", "--json"]).stdout)
    assert Path(data["digits"]["path"]).is_file() and data["digits"]["summary"].startswith("The demo")


def _complete(words: str) -> list[str]:
    script = Path(sys.executable).with_name("vae")
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "vae_cli"]
    env = {**os.environ, "COMP_WORDS": words, "COMP_CWORD": str(len(words.split(" ")) - 1),
           "_VAE_COMPLETE": "complete_bash"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


def test_completion_of_recipes_keys_and_values():
    assert {"cifar10-4000-labels", "cifar10"} <= set(_complete("vae train cif"))
    keys = _complete("vae train tiny model.l")
    assert "model.latent_dim=" in keys and "model.likelihood=" in keys
    assert set(_complete("vae train tiny model.name=")) == {"model.name=hvae", "model.name=iwae", "model.name=m1m2",
                                                          "model.name=m2", "model.name=m2h", "model.name=vae"}
    assert _complete("vae train tiny train.precision=b") == ["train.precision=bf16"]
    assert "--install-completion" in subprocess.run([sys.executable, "-m", "vae_cli", "--help"], capture_output=True,
                                                    text=True).stdout
