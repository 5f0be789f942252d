"""Hypothesis fuzz over weights-file metadata, and every file kind in every place a command reads a file:
the answer is a result or one `error:` line with exit 2, never a traceback, a hang or another code."""

from __future__ import annotations

import json
import os
import struct

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from vae_cli.cli import app

KEYS = ["model", "recipe", "classes", "image_shape", "preprocess", "metrics", "labelled_indices", "reject",
        "runtime", "head"]
json_values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40),
                                     st.floats(allow_nan=False), st.text(max_size=8)),
                           lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                   st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                           max_leaves=12)


def _clean(res) -> None:
    assert res.exit_code in (0, 2), (res.exit_code, res.stderr[-2000:])
    assert "Traceback" not in res.stderr
    if res.exit_code == 2:
        assert [ln for ln in res.stderr.splitlines() if ln.startswith("error:")], res.stderr


@pytest.fixture(scope="module")
def tiny_parts(tiny_run):
    path = tiny_run / "model.safetensors"
    with safe_open(str(path), "numpy") as f:
        meta = dict(f.metadata())
    return load_file(str(path)), meta


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(key=st.sampled_from(KEYS), value=st.one_of(json_values, st.just("__drop__")),
       command=st.sampled_from(["info", "classify", "sample"]))
@example(key="preprocess", value={}, command="classify")  # found by the fuzzer: a KeyError, exit 1
def test_tampered_metadata_is_one_line(tmp_path_factory, tiny_parts, runner, key, value, command):
    tensors, meta = tiny_parts
    meta = dict(meta)
    if value == "__drop__":
        meta.pop(key, None)
    else:
        meta[key] = json.dumps(value)
    folder = tmp_path_factory.mktemp("meta")
    w = folder / "model.safetensors"
    save_file(tensors, str(w), metadata=meta)
    from tests.imagegen import write

    img = write(folder / "a.png", "L", (8, 8))
    argv = {"info": ["info", str(w)], "classify": ["classify", str(w), str(img)],
            "sample": ["sample", str(w), "-n", "2", "-o", str(folder / "s.png")]}[command]
    _clean(runner.invoke(app, argv))


def _kinds(folder, good):
    """name -> a path of that kind."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    fifo = folder / "fifo.bin"
    os.mkfifo(fifo)
    out["fifo"] = fifo
    (folder / "dir.bin").mkdir()
    out["directory"] = folder / "dir.bin"
    (folder / "empty.bin").write_bytes(b"")
    out["empty"] = folder / "empty.bin"
    data = good.read_bytes()
    (folder / "truncated.bin").write_bytes(data[: len(data) // 2])
    out["truncated"] = folder / "truncated.bin"
    (folder / "huge.bin").write_bytes(struct.pack("<Q", 2**62) + b"{}")  # a header claiming exabytes
    out["huge-declared-size"] = folder / "huge.bin"
    (folder / "link.bin").symlink_to(folder / "missing-target")
    out["dangling-symlink"] = folder / "link.bin"
    return out


KINDS = ["fifo", "directory", "empty", "truncated", "huge-declared-size", "dangling-symlink"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("command", ["info", "eval", "plot", "sample", "classify"])
def test_every_file_kind_as_weights(tmp_path, tiny_run, runner, kind, command):
    bad = _kinds(tmp_path / "k", tiny_run / "model.safetensors")[kind]
    argv = {"info": ["info", str(bad)], "eval": ["eval", str(bad)], "plot": ["plot", str(bad), "--out", str(tmp_path)],
            "sample": ["sample", str(bad), "-o", str(tmp_path / "s.png")],
            "classify": ["classify", str(bad), str(tiny_run / "samples.png")]}[command]
    res = runner.invoke(app, argv)
    assert res.exit_code == 2, (kind, command, res.stderr)
    _clean(res)


@pytest.mark.parametrize("kind", KINDS)
def test_every_file_kind_as_an_image(tmp_path, tiny_run, runner, kind):
    from PIL import Image

    png = tmp_path / "ok.png"
    Image.new("L", (8, 8)).save(png)
    bad = _kinds(tmp_path / "k", png)[kind]
    if kind == "huge-declared-size":  # a PNG header declaring 100,000 x 100,000 pixels
        hdr = png.read_bytes()
        bad.write_bytes(hdr[:16] + struct.pack(">II", 100_000, 100_000) + hdr[24:])
    for argv in (["classify", str(tiny_run / "model.safetensors"), str(bad)],
                 ["sample", str(tiny_run / "model.safetensors"), "--reconstruct", "--images", str(bad), "-o",
                  str(tmp_path / "r.png")]):
        res = runner.invoke(app, argv)
        assert res.exit_code == 2, (kind, argv[0], res.stderr)
        _clean(res)


def test_an_empty_recipe_in_the_metadata_is_shown_with_defaults(tmp_path, tiny_parts, runner):
    """Found by the fuzz above: `recipe: {}` made `vae info` fail with a KeyError (exit 1)."""
    tensors, meta = tiny_parts
    w = tmp_path / "model.safetensors"
    save_file(tensors, str(w), metadata={**meta, "recipe": "{}"})
    res = runner.invoke(app, ["info", str(w)])
    _clean(res)
    assert res.exit_code == 0 and "digits" in res.stdout
