"""Bad input of the kinds a hostile user finds, by class: non-regular files, OS errors on given paths,
non-finite and huge numbers, duplicate keys and aliases in recipes, literal file names with glob
characters, symlinked locks, a closed stdout after a table. One clean line and a documented code each."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

from tests.imagegen import write
from vae_cli.cli import app
from vae_cli.core import recipe as R
from vae_cli.core.errors import RecipeError, VaeError

from .conftest import ROOT, TINY


def _one_line(res, code):
    assert res.exit_code == code, (res.exit_code, res.stderr)
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in res.stderr, res.stderr  # classify adds a count line
    return errors[0]


def test_a_fifo_named_like_an_image_is_refused_not_opened(tmp_path, tiny_run, runner):
    fifo = tmp_path / "x.png"
    os.mkfifo(fifo)
    result = {}
    t = threading.Thread(target=lambda: result.update(res=runner.invoke(
        app, ["classify", str(tiny_run / "model.safetensors"), str(fifo)])), daemon=True)
    t.start()
    t.join(60)
    assert not t.is_alive(), "classify blocked on a FIFO"
    assert "not a regular file" in _one_line(result["res"], 2)


def test_a_fifo_inside_a_folder_dataset_is_named(tmp_path, runner):
    for c in ("a", "b"):
        for i in range(3):
            write(tmp_path / "imgs" / c / f"{i}.png", "L", (8, 8), seed=i)
    os.mkfifo(tmp_path / "imgs" / "a" / "fifo.png")
    result = {}
    t = threading.Thread(target=lambda: result.update(res=runner.invoke(app, [
        "train", str(TINY), "data.name=folder", f"data.root={tmp_path / 'imgs'}", "--out", str(tmp_path / "runs"),
        "--device", "cpu", "--quiet"])), daemon=True)
    t.start()
    t.join(120)
    assert not t.is_alive(), "the folder dataset blocked on a FIFO"
    line = _one_line(result["res"], 2)
    assert "fifo.png" in line and "not a regular file" in line


@pytest.mark.parametrize("argv, needle", [
    (lambda w, t: ["sample", w, "-o", str(t / "adir.png")], "is a folder"),
    (lambda w, t: ["sample", w, "-o", str(t / ("n" * 300 + ".png"))], "file name is too long"),
])
def test_os_errors_on_given_paths_are_one_line_exit_2(tmp_path, tiny_run, runner, argv, needle):
    (tmp_path / "adir.png").mkdir()
    res = runner.invoke(app, argv(str(tiny_run / "model.safetensors"), tmp_path))
    assert needle in _one_line(res, 2)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder(tmp_path, tiny_run, runner):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    res = runner.invoke(app, ["sample", str(tiny_run / "model.safetensors"), "-o", str(ro / "s.png")])
    assert "permission denied" in _one_line(res, 2)


@pytest.mark.parametrize("override, needle", [
    ("train.lr=nan", "must be a finite number"),
    ("train.lr=inf", "must be a finite number"),
    ("model.dropout=.nan", "must be a finite number"),
    (f"seed={2**64}", "out of range"),
    (f"epochs={10**30}", "out of range"),
    ("train.zzz=1", "unknown recipe key 'train.zzz'"),
])
def test_numbers_and_typos_in_overrides(override, needle):
    with pytest.raises(RecipeError, match=needle) as e:
        R.load(TINY, [override])
    assert "did you mean 'train'?" not in str(e.value)


def test_duplicate_keys_and_aliases_in_a_recipe_are_refused(tmp_path):
    dup = tmp_path / "dup.yaml"
    dup.write_text("train:\n  epochs: 3\n  epochs: 5\n")
    with pytest.raises(RecipeError, match="key 'epochs' appears twice"):
        R.load(dup)
    bomb = tmp_path / "bomb.yaml"
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]" for i in range(1, 12)]
    bomb.write_text("\n".join(lines) + "\n")
    with pytest.raises(RecipeError, match="aliases"):
        R.load(bomb)
    deep = tmp_path / "deep.yaml"
    deep.write_text("a: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(RecipeError):
        R.load(deep)


def test_error_messages_are_bounded():
    assert len(str(VaeError("x" * 100_000))) <= VaeError.MAX_CHARS


def test_sample_refuses_non_finite_temperature_and_huge_seeds(tmp_path, tiny_run, runner):
    w = str(tiny_run / "model.safetensors")
    assert "finite" in _one_line(runner.invoke(app, ["sample", w, "--temperature", "inf", "-o",
                                                     str(tmp_path / "s.png")]), 2)
    res = runner.invoke(app, ["sample", w, "--seed", str(10**23), "-o", str(tmp_path / "s.png")])
    assert res.exit_code == 2 and not (tmp_path / "s.png").exists()


def test_a_real_file_with_glob_characters_is_a_file(tmp_path, tiny_run, runner):
    path = write(tmp_path / "a[1].png", "L", (8, 8))
    res = runner.invoke(app, ["classify", str(tiny_run / "model.safetensors"), str(path), "-f", "csv"])
    assert res.exit_code == 0, res.stderr
    assert "a[1].png" in res.stdout


def test_top_k_is_capped_at_the_number_of_classes(tmp_path, tiny_run, runner):
    path = write(tmp_path / "a.png", "L", (8, 8))
    res = runner.invoke(app, ["classify", str(tiny_run / "model.safetensors"), str(path), "--top-k", "999",
                              "-f", "csv"])
    header, row = res.stdout.strip().splitlines()
    assert len(header.split(",")) == 1 + 2 * 10 == len(row.split(","))


def test_a_symlinked_lock_is_refused_and_its_target_untouched(tmp_path, runner):
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    (tmp_path / "runs" / "tiny").mkdir(parents=True)
    (tmp_path / "runs" / "tiny" / ".lock").symlink_to(target)
    res = runner.invoke(app, ["train", str(TINY), "--out", str(tmp_path / "runs"), "--exist-ok", "--device", "cpu",
                              "--quiet"])
    assert "symbolic link" in _one_line(res, 2)
    assert target.read_text() == "keep me"


def test_info_into_a_closed_pipe_exits_141(tiny_run):
    cmd = f"{sys.executable} -m vae_cli info {tiny_run / 'model.safetensors'} | true; echo ${{PIPESTATUS[0]}}"
    out = subprocess.run(["bash", "-c", cmd], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() in ("0", "141"), out  # 0 when the table fit the pipe before it closed
    assert "Traceback" not in out.stderr and "Exception ignored" not in out.stderr, out.stderr


def test_a_run_that_fails_on_bad_data_leaves_no_folder(tmp_path, runner):
    res = runner.invoke(app, ["train", str(TINY), "data.name=folder", f"data.root={tmp_path / 'nope'}",
                              "--out", str(tmp_path / "runs"), "--device", "cpu", "--quiet"])
    assert res.exit_code == 2
    assert not (tmp_path / "runs" / "tiny").exists()  # so the next run is runs/tiny again, not tiny-2


def test_written_files_have_the_usual_permissions_and_no_temp_left(tiny_run):
    umask = os.umask(0)
    os.umask(umask)
    for name in ("model.safetensors", "last.safetensors", "metrics.csv", "recipe.yaml"):
        assert (tiny_run / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
    assert not [p.name for p in tiny_run.iterdir() if p.name.startswith((".vae-tmp-", ".model"))]


def test_read_only_dataset_builds_never_download(monkeypatch):
    """eval, plot and sample rebuild the dataset from the weights file's recipe with read_only=True: a
    recipe saying data.download=true reaches the builder as false."""
    from vae_cli.data import base

    seen = []
    original = base.DATASETS.get("digits")
    monkeypatch.setitem(base.DATASETS._entries, "digits", lambda cfg: seen.append(cfg.download) or original(cfg))
    from vae_cli.core import recipe as recipe_mod

    raw = recipe_mod.load(TINY, ["data.download=true"])
    data = base.build_dataset(raw.data, raw.seed, read_only=True)
    assert seen == [False] and len(data.train_x)


def test_mnist_reads_raw_files_never_a_processed_pickle(tmp_path):
    """torchvision prefers processed/*.pt (read with torch.load) when present: a root must not reach it."""
    import torch

    from tests.test_datasets import mnist_idx_root
    from vae_cli.core.recipe import DataConfig
    from vae_cli.data import build_dataset

    mnist_idx_root(tmp_path)
    processed = tmp_path / "MNIST" / "processed"
    processed.mkdir()
    for name in ("training.pt", "test.pt"):
        torch.save((torch.zeros(5, 28, 28, dtype=torch.uint8), torch.zeros(5, dtype=torch.long)), processed / name)
    d = build_dataset(DataConfig(name="mnist", root=str(tmp_path), holdout_fraction=0), 0)
    assert d.train_x.shape == (30, 1, 28, 28) and d.test_x.shape == (10, 1, 28, 28)


def resume_a_damaged_state(tmp_path, runner, damage):
    """Train the tiny recipe, rewrite its resume state as `damage(tensors, metadata)` returns them, resume."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    args = ["train", str(TINY), "--out", str(tmp_path), "--name", "r", "--device", "cpu", "--quiet"]
    assert runner.invoke(app, args).exit_code == 0
    state = tmp_path / "r" / "last.safetensors"
    with safe_open(str(state), "pt") as f:
        meta = f.metadata()
    tensors, meta = damage(load_file(str(state)), meta)
    save_file(tensors, str(state), metadata=meta)
    return runner.invoke(app, [*args, "--resume"])


def test_a_damaged_resume_state_is_one_line_exit_2(tmp_path, runner):
    import torch

    # the same recipe, the tensors gone
    res = resume_a_damaged_state(tmp_path, runner, lambda tensors, meta: ({"perm": torch.arange(3)}, meta))
    assert "delete it to start the run over" in _one_line(res, 2)


def test_nul_characters_in_recipe_text_are_refused(tmp_path):
    p = tmp_path / "nul.yaml"
    p.write_text('data:\n  root: "a\\0b"\n')
    with pytest.raises(RecipeError, match="NUL"):
        R.load(p)
