"""Every kind of bad input gets one line naming the problem, a documented exit code, and no traceback.
Table-driven: each row builds its input for real (files on disk), runs the command, checks the line."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from safetensors.torch import save_file

from vae_cli.cli import app

from .conftest import ROOT, TINY
from .imagegen import write


def _recipe(tmp: Path, text: str | bytes) -> str:
    p = tmp / "r.yaml"
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(p)


def _weights_with(tmp: Path, tiny_run: Path, **meta_changes) -> str:
    """A copy of the tiny model whose metadata is changed as given."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    src = tiny_run / "model.safetensors"
    with safe_open(str(src), "numpy") as f:
        meta = dict(f.metadata())
    meta.update(meta_changes)
    out = tmp / "changed.safetensors"
    save_file(load_file(str(src)), str(out), metadata=meta)
    return str(out)


def _huge_png(tmp: Path) -> str:
    p = tmp / "huge.png"
    Image.new("1", (9000, 9000)).save(p)  # 81 megapixels, a few kB on disk
    return str(p)


def _png_header_only(tmp: Path) -> str:
    p = tmp / "header.png"
    p.write_bytes(b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + struct.pack(">II", 10, 10))
    return str(p)


def _truncated_png(tmp: Path) -> str:
    good = write(tmp / "good.png", "RGB", (64, 64))
    p = tmp / "cut.png"
    p.write_bytes(good.read_bytes()[:200])
    return str(p)


def _empty_folder_classes(tmp: Path) -> str:
    (tmp / "imgs" / "a").mkdir(parents=True)
    (tmp / "imgs" / "b").mkdir(parents=True)
    return str(tmp / "imgs")


W = "{W}"  # placeholder for the tiny model's weights path

# (id, args builder, exit code, message). Builders get (tmp_path, tiny_run) and return the argv.
CASES = [
    # --- recipes and overrides ---
    ("yaml-syntax", lambda t, w: ["train", _recipe(t, "model: [1, 2")], 2, "is not valid YAML at line"),
    ("yaml-not-mapping", lambda t, w: ["train", _recipe(t, "- 1\n- 2\n")], 2, "must be a mapping"),
    ("yaml-binary", lambda t, w: ["train", _recipe(t, b"\xff\xfe\x00garbage")], 2, "not UTF-8"),
    ("recipe-missing", lambda t, w: ["train", str(t / "none.yaml")], 2, "not found"),
    ("recipe-unknown-key", lambda t, w: ["train", _recipe(t, "train:\n  epohcs: 3\n")], 2,
     "did you mean 'train.epochs'"),
    ("recipe-wrong-type", lambda t, w: ["train", _recipe(t, "train:\n  epochs: five\n")], 2, "must be an int"),
    ("recipe-out-of-range", lambda t, w: ["train", _recipe(t, "model:\n  latent_dim: 0\n")], 2, "must be >= 1"),
    ("recipe-section-type", lambda t, w: ["train", _recipe(t, "model: 3\n")], 2, "section 'model' must be a mapping"),
    ("override-syntax", lambda t, w: ["train", str(TINY), "epochs"], 2, "is not key=value"),
    ("override-unknown", lambda t, w: ["train", str(TINY), "model.latnt_dim=2"], 2, "did you mean 'model.latent_dim'"),
    ("override-choice", lambda t, w: ["train", str(TINY), "model.likelihood=poisson"], 2, "must be one of"),
    ("unknown-dataset", lambda t, w: ["train", str(TINY), "name=x", "root=y", "data.name=nope"], 2,
     "unknown dataset 'data.name=nope'"),
    ("unknown-model", lambda t, w: ["train", str(TINY), "model.name=vea"], 2, "did you mean 'vae'"),
    ("labels-exceed-class", lambda t, w: ["train", str(TINY), "data.labels_per_class=500"], 2, "has only"),
    ("folder-root-missing", lambda t, w: ["train", str(TINY), "data.name=folder", f"data.root={t}/nope"], 2,
     "is not a folder"),
    ("folder-empty-classes", lambda t, w: ["train", str(TINY), "data.name=folder",
                                           f"data.root={_empty_folder_classes(t)}"], 2, "needs at least one image"),
    ("mnist-missing", lambda t, w: ["train", str(TINY), "data.name=mnist", f"data.root={t}"], 2,
     "/MNIST/raw/': put"),
    ("run-name-path", lambda t, w: ["train", str(TINY), "--name", "a/b", "--out", str(t)], 2,
     "not a plain folder name"),
    ("out-is-a-file", lambda t, w: ["train", str(TINY), "--out", str(write(t / "f.png", "L", (4, 4)))], 2,
     "cannot create run folder"),
    ("cuda-absent", lambda t, w: ["train", str(TINY), "--device", "cuda", "--out", str(t)], 2, "no CUDA GPU"),
    ("promote-metric", lambda t, w: ["train", str(TINY), "--promote", str(t / "p"), "--promote-metric", "loss"], 2,
     "--promote-metric must be one of"),
    # --- weights files ---
    ("weights-missing", lambda t, w: ["eval", str(t / "none.safetensors")], 2, "not found"),
    ("weights-folder", lambda t, w: ["info", str(t)], 2, "is a folder, not a weights file"),
    ("weights-empty", lambda t, w: ["info", str(_bytes(t, b""))], 2, "not a readable safetensors file"),
    ("weights-garbage", lambda t, w: ["eval", str(_bytes(t, b"\x00" * 64))], 2, "not a readable safetensors file"),
    ("weights-truncated", lambda t, w: ["sample", str(_bytes(t, (w / "model.safetensors").read_bytes()[:300])),
                                        "-o", str(t / "s.png")], 2, "not a readable safetensors file"),
    ("weights-foreign", lambda t, w: ["classify", _foreign(t), str(write(t / "a.png", "L", (8, 8)))], 2,
     "not a vae weights file"),
    ("weights-bad-json", lambda t, w: ["eval", _weights_with(t, w, recipe="{broken")], 2, "damaged metadata 'recipe'"),
    ("weights-bad-recipe", lambda t, w: ["eval", _weights_with(t, w, recipe=json.dumps({"modle": {}}))], 2,
     "carries a recipe this version cannot read"),
    ("weights-shape-mismatch", lambda t, w: ["sample", _weights_with(t, w, recipe=json.dumps(
        {"model": {"latent_dim": 9, "width": 8, "hidden": 32, "head_hidden": 16}})), "-o", str(t / "s.png")], 2,
     "do not fit model"),
    # --- images ---
    ("image-empty", lambda t, w: ["classify", W, str(_bytes(t, b"", "e.png"))], 2, "e.png' is not an image"),
    ("image-text", lambda t, w: ["classify", W, str(_bytes(t, b"hello", "t.jpg"))], 2, "t.jpg' is not an image"),
    ("image-truncated", lambda t, w: ["classify", W, _truncated_png(t)], 2, "cut.png"),
    ("image-header-only", lambda t, w: ["classify", W, _png_header_only(t)], 2, "header.png"),
    ("image-huge", lambda t, w: ["classify", W, _huge_png(t)], 2, "is too large"),
    ("image-folder-empty", lambda t, w: ["classify", W, str(_dir(t))], 2, "holds no images"),
    ("image-glob-empty", lambda t, w: ["classify", W, str(t / "*.png")], 2, "matches no files"),
    ("image-missing", lambda t, w: ["classify", W, str(t / "nope.png")], 2, "does not exist"),
    ("reconstruct-bad-image", lambda t, w: ["sample", W, "--reconstruct", "--images", str(_bytes(t, b"x", "r.png")),
                                            "-o", str(t / "o.png")], 2, "r.png' is not an image"),
    # --- arguments ---
    ("sample-unknown-class", lambda t, w: ["sample", W, "--class", "eleven", "-o", str(t / "s.png")], 2,
     "not one of the model's classes"),
    ("sample-not-png", lambda t, w: ["sample", W, "-o", str(t / "s.jpg")], 2, "must end in .png"),
    ("eval-split", lambda t, w: ["eval", W, "--split", "val"], 2, "--split must be one of test, train, holdout"),
    ("info-nothing", lambda t, w: ["info"], 2, "give a weights file"),
    ("interpolate-bad-image", lambda t, w: ["sample", W, "--interpolate", str(_bytes(t, b"x", "a.png")),
                                            str(_bytes(t, b"y", "b.png")), "-o", str(t / "o.png")], 2,
     "a.png' is not an image"),
    ("interpolate-with-reconstruct", lambda t, w: ["sample", W, "--interpolate", "a.png", "b.png",
                                                   "--reconstruct"], 2, "leave out --reconstruct"),
    ("plot-map", lambda t, w: ["plot", W, "--map", "umap", "--out", str(t)], 2, "--map must be tsne or pca"),
]


def _bytes(tmp: Path, data: bytes, name: str = "w.safetensors") -> Path:
    p = tmp / name
    p.write_bytes(data)
    return p


def _dir(tmp: Path) -> Path:
    d = tmp / "nothing-here"
    d.mkdir()
    (d / "readme.txt").write_text("no images")
    return d


def _foreign(tmp: Path) -> str:
    import torch

    p = tmp / "foreign.safetensors"
    save_file({"weight": torch.zeros(3)}, str(p), metadata={"format": "pt"})
    return str(p)


def test_table_has_at_least_30_rows():
    assert len(CASES) >= 30


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, tmp_path, tiny_run, runner):
    _, build, code, message = case
    args = [a.replace(W, str(tiny_run / "model.safetensors")) for a in build(tmp_path, tiny_run)]
    before = sorted(p.name for p in tiny_run.iterdir())
    res = runner.invoke(app, args)
    assert res.exit_code == code, (res.exit_code, res.stdout, res.stderr)
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert lines and message in lines[0], res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    assert sorted(p.name for p in tiny_run.iterdir()) == before  # nothing on disk lost or added


@pytest.mark.parametrize("argv, message", [
    (["train", "recipes/tiny.yaml", "--precision", "fp8"], "Invalid value for '--precision'"),
    (["classify"], "Missing argument 'weights'"),
    (["sample", "x.safetensors", "-n", "0"], "Invalid value for '-n'"),
    (["classify", "x.safetensors", "a.png", "--top-k", "0"], "Invalid value for '--top-k'"),
    (["classify", "x.safetensors", "a.png", "--reject-rate", "0.9"], "Invalid value for '--reject-rate'"),
    (["eval", "x.safetensors", "--iw-samples", "-1"], "Invalid value for '--iw-samples'"),
    (["classify", "x.safetensors", "a.png", "--format", "xml"], "Invalid value for '--format'"),
    (["bogus"], "No such command 'bogus'"),
])
def test_usage_errors_are_one_line_too(argv, message):
    """Through the real console entry point (a subprocess): click's usage errors become one line, exit 2."""
    out = subprocess.run([sys.executable, "-m", "vae_cli", *argv], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and message in out.stderr and out.stderr.startswith("error:")


@pytest.mark.parametrize("mode, name", [("CMYK", "cmyk.jpg"), ("I;16", "deep.png"), ("P", "pal.png")])
def test_odd_but_valid_images_classify(tmp_path, tiny_run, runner, mode, name):
    path = write(tmp_path / name, mode, (40, 30))
    res = runner.invoke(app, ["classify", str(tiny_run / "model.safetensors"), str(path)])
    assert res.exit_code == 0, res.stderr


def test_animated_gif_uses_the_first_frame(tmp_path, tiny_run, runner):
    frames = [Image.new("L", (20, 20), v) for v in (0, 255, 128)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    frames[0].save(tmp_path / "first.png")
    frames[1].save(tmp_path / "second.png")
    probs = {}
    for name in ("anim.gif", "first.png", "second.png"):
        res = runner.invoke(app, ["classify", str(tiny_run / "model.safetensors"), str(tmp_path / name),
                                  "--top-k", "10", "-f", "json"])
        assert res.exit_code == 0, res.stderr
        probs[name] = {p["class"]: p["prob"] for p in json.loads(res.stdout)[0]["top"]}
    assert probs["anim.gif"] == probs["first.png"]  # the first frame, decoded as a still image would be
    assert probs["anim.gif"] != probs["second.png"]  # (and the frames differ enough to tell)


def test_class_count_change_is_caught_by_eval(tmp_path, runner):
    for c in ("a", "b"):
        for i in range(4):
            write(tmp_path / "imgs" / c / f"{i}.png", "L", (12, 12), seed=i)
    res = runner.invoke(app, ["train", str(TINY), "data.name=folder", f"data.root={tmp_path / 'imgs'}",
                              "data.image_size=8", "data.train_limit=null", "epochs=1", "--out", str(tmp_path),
                              "--quiet", "--device", "cpu"])
    assert res.exit_code == 0, res.stderr
    for i in range(4):
        write(tmp_path / "imgs" / "c" / f"{i}.png", "L", (12, 12), seed=i)
    res = runner.invoke(app, ["eval", str(tmp_path / "tiny" / "model.safetensors")])
    assert res.exit_code == 2 and "3 classes but the model expects" in res.stderr
