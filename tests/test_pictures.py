"""The run's pictures and report.html: present, the right size, not blank, laid out as a grid, rebuilt
the same by `vae plot`, and the report opened in a real headless browser (Debian's chromium)."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vae_cli.cli import app

PICTURES = ["samples.png", "samples-by-class.png", "reconstructions.png", "interpolation.png", "latent-map.png",
            "curves.png", "confusion.png"]
SCALE, TILE = 12, 8 + 1  # 8x8 digits enlarged 12x (tiles of ~96 pixels); 1 pixel of padding per tile
PAD = 128  # make_grid's pad value 0.5


def _png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def _grid_shape(rows: int, cols: int) -> tuple[int, int]:
    return ((rows * TILE + 1) * SCALE, (cols * TILE + 1) * SCALE)


def _tiles(arr: np.ndarray, rows: int, cols: int) -> list[np.ndarray]:
    s = SCALE
    return [arr[(r * TILE + 1) * s:(r * TILE + TILE) * s, (c * TILE + 1) * s:(c * TILE + TILE) * s]
            for r in range(rows) for c in range(cols)]


def test_training_writes_every_picture_and_the_report(digits_run):
    for name in PICTURES + ["report.html"]:
        assert (digits_run / name).is_file(), name
        assert (digits_run / name).stat().st_size > 500, name


def test_class_grid_layout(digits_run):
    """One row per class, 10 per row: padding lines exactly where the layout puts them, tiles not blank."""
    arr = _png(digits_run / "samples-by-class.png")
    assert arr.shape == _grid_shape(10, 10)
    for k in range(11):  # the padding rows and columns between tiles
        band = slice(k * TILE * SCALE, (k * TILE + 1) * SCALE)
        assert (arr[band, :] == PAD).all() and (arr[:, band] == PAD).all()
    tiles = _tiles(arr, 10, 10)
    assert sum(t.std() > 2 for t in tiles) >= 95  # generated digits, not flat squares


def test_interpolation_rows_start_and_end_at_the_real_images(digits_run):
    from vae_cli.artifacts.pictures import pair_indices
    from vae_cli.core.recipe import load
    from vae_cli.data import build_dataset

    arr = _png(digits_run / "interpolation.png")
    rows, cols = 8, 12
    assert arr.shape == _grid_shape(rows, cols)
    data = build_dataset(load(digits_run / "recipe.yaml").data, 0)
    a, b = pair_indices(data.test_y, rows)
    tiles = _tiles(arr, rows, cols)
    for r in range(rows):
        for tile, idx in ((tiles[r * cols], a[r]), (tiles[r * cols + cols - 1], b[r])):
            want = (data.test_x[idx, 0].numpy() * 255 + 0.5).astype(np.uint8).repeat(SCALE, 0).repeat(SCALE, 1)
            assert np.array_equal(tile, want)
        inner = tiles[r * cols + 1: r * cols + cols - 1]
        assert all(t.std() > 1 for t in inner)


def test_plots_have_size_and_content(digits_run):
    latent = _png(digits_run / "latent-map.png")
    assert latent.shape[:2] == (560, 640)
    colours = {tuple(c) for c in latent[..., :3].reshape(-1, 3)[::7]}
    assert len(colours) > 20  # ten class colours, anti-aliased, on white
    confusion = _png(digits_run / "confusion.png")
    assert min(confusion.shape[:2]) >= 400 and confusion[..., :3].std() > 10
    curves = _png(digits_run / "curves.png")
    # the digits recipe trains a plain VAE: 4 panels (its classifier is fitted after the loop, so no accuracy panel)
    assert curves.shape[:2] == (640, 1200) and curves[..., :3].std() > 10


def test_report_inlines_every_picture(digits_run):
    page = (digits_run / "report.html").read_text()
    images = re.findall(r'<img src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == len(PICTURES)
    assert {base64.b64decode(i) for i in images} == {(digits_run / n).read_bytes() for n in PICTURES}
    assert "accuracy" in page and "active units" in page and "latent_dim" in page  # metrics and recipe
    assert "trained on</td><td>cpu/" in page and "--reject threshold" in page  # facts about the run


def test_plot_rebuilds_the_same_pictures(digits_run, tmp_path, runner):
    res = runner.invoke(app, ["plot", str(digits_run / "model.safetensors"), "--out", str(tmp_path), "--json"])
    assert res.exit_code == 0, res.output
    written = json.loads(res.stdout)["written"]
    assert {Path(p).name for p in written.values()} == set(PICTURES) | {"report.html"}
    for name in ("samples.png", "samples-by-class.png", "interpolation.png", "reconstructions.png"):
        assert (tmp_path / name).read_bytes() == (digits_run / name).read_bytes(), name


def test_sample_interpolate_between_two_files(digits_run, tmp_path, runner):
    from vae_cli.core.recipe import load
    from vae_cli.data import build_dataset

    data = build_dataset(load(digits_run / "recipe.yaml").data, 0)
    files = []
    for i in (0, 1):
        img = (data.test_x[i, 0].numpy() * 255).round().astype(np.uint8).repeat(3, 0).repeat(3, 1)  # 24x24 file
        files.append(tmp_path / f"{i}.png")
        Image.fromarray(img).save(files[-1])
    out = tmp_path / "line.png"
    res = runner.invoke(app, ["sample", str(digits_run / "model.safetensors"), "--interpolate", str(files[0]),
                              str(files[1]), "--steps", "5", "-o", str(out)])
    assert res.exit_code == 0, res.output
    arr = _png(out)
    assert arr.shape == _grid_shape(1, 7)
    tiles = _tiles(arr, 1, 7)
    assert not np.array_equal(tiles[1], tiles[5])  # the line moves from one code to the other
    bad = runner.invoke(app, ["sample", str(digits_run / "model.safetensors"), "--interpolate", str(files[0])])
    assert bad.exit_code == 2


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium)")
def test_report_opens_in_a_headless_browser(digits_run, tmp_path):
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000"]
    url = (digits_run / "report.html").resolve().as_uri()
    dom = subprocess.run(flags + ["--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    loaded = re.search(r'<body[^>]*data-images-loaded="(\d+)"', dom.stdout)
    assert loaded and int(loaded.group(1)) == len(PICTURES), dom.stdout[:500]
    shot = tmp_path / "page.png"
    run = subprocess.run(flags + [f"--screenshot={shot}", "--window-size=1200,2400", url], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    page = np.asarray(Image.open(shot).convert("L"))
    assert page.shape == (2400, 1200) and page.std() > 20  # text, tables and pictures, not a blank page


def test_report_is_rewritten_atomically(digits_run, tmp_path, runner):
    """`vae plot` into a folder leaves no temp files behind."""
    runner.invoke(app, ["plot", str(digits_run / "model.safetensors"), "--out", str(tmp_path)])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
