"""Issue 30, hardening round two: what commands write (one output-path rule for all of them), file names that
are not ordinary text (line breaks, non-UTF-8 bytes) in the paths they write and read, standard input that is
closed, empty or NUL-separated, trackers that do not answer, and the leftovers of the first round.

Every test here failed on the code before the fix: an export over its own weights, a device replaced by the
atomic rename, a 0444 file left 0644, a folder named as output reported through a `.vae-tmp-*` path, an
orphan `.paths.txt`, a `.paths.txt` one line longer than the matrix, `UnicodeEncodeError`, `TypeError` on a
closed stdin, `VAE_THREADS=abc` accepted by export, a damaged resume state's JSON as exit 1."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.imagegen import write
from vae_cli.artifacts.tables import read_paths, write_paths
from vae_cli.core import fsutil
from vae_cli.core.errors import UsageError

from .conftest import ROOT, TINY

ODD_NAMES = [b"plain.png", b"caf\xe9.png", b"new\nline.png", b'"quoted.png', b"back\\slash.png", b"tab\tx.png",
             b"cr\r.png", b" lead.png"]


def _vae(*args, stdin=None, env=None, timeout=300, cwd=None):
    """The real CLI in a subprocess (stdin closed or fed as bytes, names as bytes)."""
    return subprocess.run([sys.executable, "-m", "vae_cli", *args], cwd=cwd or ROOT, input=stdin,
                          stdin=subprocess.DEVNULL if stdin is None else None, capture_output=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def _error_line(res, code=2) -> str:
    err = res.stderr.decode("utf-8", "replace") if isinstance(res.stderr, bytes) else res.stderr
    assert res.returncode == code, (res.returncode, err)
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _files(folder) -> set[str]:
    return {p.name for p in folder.iterdir()}


# --- the output-path rule (core/fsutil.check_output, used by every writer) ------------------------------------
def test_check_output_refuses_inputs_folders_and_special_files(tmp_path):
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"x")
    link = tmp_path / "alias.safetensors"
    link.symlink_to(f)
    with pytest.raises(UsageError, match="is the file this command reads"):
        fsutil.check_output(link, [f])  # the same file under another name
    with pytest.raises(UsageError, match="is a folder"):
        fsutil.check_output(tmp_path, [])
    fifo = tmp_path / "out.onnx"
    os.mkfifo(fifo)
    with pytest.raises(UsageError, match="is a FIFO"):
        fsutil.check_output(fifo)
    assert fsutil.check_output(tmp_path / "new.onnx", [f]) == tmp_path / "new.onnx"


def test_no_write_replaces_a_device_or_fifo_even_when_it_appears_late(tmp_path):
    fifo = tmp_path / "late.txt"
    # the target turns into a FIFO while the file is computed
    with pytest.raises(UsageError, match="FIFO"), fsutil.atomic_path(fifo) as tmp:
        tmp.write_text("data")
        os.mkfifo(fifo)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert _files(tmp_path) == {"late.txt"}  # nothing left behind


def test_in_place_rewrite_keeps_the_mode_and_new_files_get_the_umask(tmp_path):
    f = tmp_path / "ro.txt"
    f.write_text("old")
    f.chmod(0o444)
    fsutil.write_text(f, "new")
    assert f.read_text() == "new" and stat.S_IMODE(f.stat().st_mode) == 0o444
    fsutil.write_text(tmp_path / "fresh.txt", "x")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE((tmp_path / "fresh.txt").stat().st_mode) == 0o666 & ~mask


def test_a_group_of_files_is_all_or_nothing(tmp_path):
    (tmp_path / "a.npy").write_text("old a")
    targets = [tmp_path / "a.npy", tmp_path / "a.paths.txt"]
    with pytest.raises(RuntimeError), fsutil.atomic_paths(targets) as (ta, tb):
        ta.write_text("new a")
        tb.write_text("new b")
        raise RuntimeError("killed mid-write")
    assert (tmp_path / "a.npy").read_text() == "old a" and _files(tmp_path) == {"a.npy"}


def test_export_over_its_own_weights_is_refused_and_they_survive(tiny_run, tmp_path):
    w = tmp_path / "model.safetensors"
    w.write_bytes((tiny_run / "model.safetensors").read_bytes())
    before = w.read_bytes()
    line = _error_line(_vae("export", str(w), "-o", str(w), "--format", "torchscript"))
    assert "is the file this command reads" in line and str(w) in line
    assert w.read_bytes() == before


@pytest.mark.parametrize("command", ["export", "calibrate", "sample", "embed"])
def test_outputs_that_are_devices_fifos_or_folders_are_refused_with_the_users_path(command, tiny_run, tmp_path,
                                                                                   digits_run):
    w = (digits_run if command == "calibrate" else tiny_run) / "model.safetensors"
    suffix = {"export": ".pt", "calibrate": ".safetensors", "sample": ".png", "embed": ".npy"}[command]
    fifo, folder = tmp_path / f"fifo{suffix}", tmp_path / f"dir{suffix}"
    os.mkfifo(fifo)
    folder.mkdir()
    argv = {"export": ["--format", "torchscript"], "embed": [str(ROOT / "tests")]}.get(command, [])
    for target, needle in ((fifo, "is a FIFO"), (folder, "is a folder")):
        line = _error_line(_vae(command, str(w), *argv, "-o", str(target)))
        assert needle in line and str(target) in line and ".vae-tmp" not in line
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and folder.is_dir() and not any(folder.iterdir())
    assert _files(tmp_path) == {fifo.name, folder.name}


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_character_device_is_never_replaced(tiny_run):
    line = _error_line(_vae("export", str(tiny_run / "model.safetensors"), "-o", "/dev/full",
                            "--format", "torchscript"))
    assert "character device" in line
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode)


def test_calibrate_in_place_keeps_a_read_only_mode(digits_run, tmp_path):
    w = tmp_path / "model.safetensors"
    w.write_bytes((digits_run / "model.safetensors").read_bytes())
    w.chmod(0o444)
    res = _vae("calibrate", str(w), "--reject-rate", "0.05")
    assert res.returncode == 0, res.stderr
    assert stat.S_IMODE(w.stat().st_mode) == 0o444
    assert _files(tmp_path) == {"model.safetensors"}


def test_promote_target_that_is_a_folder_is_refused_before_training(tmp_path):
    (tmp_path / "prod").mkdir()
    line = _error_line(_vae("train", str(TINY), "--out", str(tmp_path / "runs"), "--promote", str(tmp_path / "prod")))
    assert "--promote target" in line and "is a folder" in line
    assert not (tmp_path / "runs").exists()


# --- file names in what is written and read --------------------------------------------------------------
def test_paths_file_round_trips_every_legal_name(tmp_path):
    names = [os.fsdecode(n) for n in ODD_NAMES]
    write_paths(tmp_path / "p.paths.txt", names)
    assert read_paths(tmp_path / "p.paths.txt") == names
    text = (tmp_path / "p.paths.txt").read_bytes()
    assert text.count(b"\n") == len(names) and b"caf\xe9.png\n" in text  # raw bytes, one line per name


def _odd_folder(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, n in enumerate(ODD_NAMES):
        src = tmp_path / f"src{i}.png"
        write(src, "L", (8, 8), seed=i)
        os.rename(src, os.path.join(os.fsencode(folder), n))
    return folder


def test_embed_rows_line_up_with_odd_names(tiny_run, tmp_path):
    folder = _odd_folder(tmp_path)
    res = _vae("embed", str(tiny_run / "model.safetensors"), str(folder), "-o", str(tmp_path / "e.npy"))
    assert res.returncode == 0, res.stderr
    matrix = np.load(tmp_path / "e.npy")
    names = read_paths(tmp_path / "e.paths.txt")
    assert len(names) == len(matrix) == len(ODD_NAMES)
    assert sorted(os.fsencode(os.path.basename(n)) for n in names) == sorted(ODD_NAMES)
    for n in names:
        assert os.path.isfile(n)  # each written path opens the file it names
    res = _vae("embed", str(tiny_run / "model.safetensors"), str(folder), "-o", str(tmp_path / "e.csv"))
    assert res.returncode == 0, res.stderr
    import csv

    with open(tmp_path / "e.csv", newline="", encoding="utf-8", errors="surrogateescape") as f:
        rows = list(csv.reader(f))[1:]
    assert sorted(r[0] for r in rows) == sorted(names)


def test_embed_leaves_no_orphan_paths_file_when_the_matrix_cannot_be_written(tiny_run, tmp_path):
    (tmp_path / "e.npy").mkdir()
    _error_line(_vae("embed", str(tiny_run / "model.safetensors"), str(ROOT / "tests"), "-o", str(tmp_path / "e.npy")))
    assert _files(tmp_path) == {"e.npy"}


# --- standard input -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["classify", "embed"])
def test_closed_stdin_is_one_line(command, tiny_run, tmp_path):
    args = [str(tiny_run / "model.safetensors"), "-"] + (["-o", str(tmp_path / "e.npy")] if command == "embed" else [])
    quoted = " ".join(f"'{a}'" for a in args)
    res = subprocess.run(["bash", "-c", f"'{sys.executable}' -m vae_cli {command} {quoted} <&-"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert "standard input is closed" in _error_line(res)
    assert not any(tmp_path.iterdir())


def test_stdin_names_as_bytes_lines_or_nul_separated(tiny_run, tmp_path):
    folder = _odd_folder(tmp_path)
    listing = [os.path.join(os.fsencode(folder), n) for n in ODD_NAMES]
    w = str(tiny_run / "model.safetensors")
    res = _vae("classify", w, "-", "--format", "json", stdin=b"\0".join(listing) + b"\0")
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)
    assert sorted(os.fsencode(r["path"]) for r in rows) == sorted(listing)
    plain = [p for p in listing if b"\n" not in p and b"\r" not in p]
    res = _vae("classify", w, "-", "--format", "json", stdin=b"\n".join(plain) + b"\n\n")
    assert res.returncode == 0, res.stderr
    assert len(json.loads(res.stdout)) == len(plain)
    assert "standard input was empty" in _error_line(_vae("classify", w, "-", stdin=b"\n \n"))


# --- threads, trackers, leftovers ---------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["export", "plot", "calibrate"])
def test_a_bad_vae_threads_is_refused_by_every_computing_command(command, tiny_run, tmp_path):
    line = _error_line(_vae(command, str(tiny_run / "model.safetensors"), env={"VAE_THREADS": "abc"}))
    assert "VAE_THREADS" in line
    assert not any(tmp_path.iterdir())


def test_a_tracking_server_that_does_not_answer_costs_seconds_and_the_run_goes_on(tmp_path):
    pytest.importorskip("mlflow")
    t0 = time.monotonic()
    res = _vae("train", str(TINY), "--out", str(tmp_path), "train.loggers=[mlflow]", "train.epochs=2",
               env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"})
    took = time.monotonic() - t0
    err = res.stderr.decode()
    assert res.returncode == 0, err
    assert took < 90, took  # MLflow's own retries waited 254 s
    warnings = [ln for ln in err.splitlines() if "mlflow logger failed at start-up" in ln]
    assert len(warnings) == 1 and "Traceback" not in err
    assert len((tmp_path / "tiny" / "metrics.csv").read_text().splitlines()) == 3  # header + 2 epochs


def test_damaged_json_in_a_resume_state_is_exit_2(tmp_path, runner):
    from tests.test_hardening import resume_a_damaged_state

    res = resume_a_damaged_state(tmp_path, runner, lambda tensors, meta: (tensors, {**meta, "progress": "{not json"}))
    assert res.exit_code == 2 and "damaged metadata" in res.stderr and "delete it" in res.stderr


def test_probe_labels_beyond_a_class_names_the_option(tiny_run):
    line = _error_line(_vae("eval", str(tiny_run / "model.safetensors"), "-k", "0", "--probe-labels", "100000"))
    assert "--probe-labels" in line and "labels_per_class" not in line


def test_latent_map_of_a_tiny_split_projects():
    from vae_cli.artifacts.plots import project_2d

    xy, how = project_2d(np.ones((1, 8), np.float32), "pca")
    assert xy.shape == (1, 2)


@pytest.mark.parametrize("method", ["tsne", "pca"])
@pytest.mark.parametrize("spread", ["point", "line"])
def test_latent_map_of_codes_without_a_plane_projects(method, spread):
    """A folder of identical images gives identical codes: t-SNE divided by their spread (NaN, and a segfault
    inside `vae train`'s finish), PCA's variance shares were NaN. Codes on one point or one line keep their
    first two coordinates, finite."""
    from vae_cli.artifacts.plots import project_2d

    z = np.ones((40, 8), np.float32)
    if spread == "line":
        z = z + np.linspace(0, 1, 40, dtype=np.float32)[:, None] * np.arange(8, dtype=np.float32)
    xy, how = project_2d(z, method)
    assert xy.shape == (40, 2) and np.isfinite(xy).all() and how == "first two latent coordinates"


def test_one_class_metrics_raise_no_warning():
    import warnings

    from vae_cli.evaluation.metrics import classification

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = classification(np.ones((5, 1), np.float32), np.zeros(5, np.int64), ["only"])
    assert res["accuracy"] == 1.0 and res["confusion_matrix"] == [[5]]
