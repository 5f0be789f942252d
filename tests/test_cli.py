"""The commands end to end through Typer's CliRunner, on a tiny model trained once per session."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys

import pytest
import yaml
from PIL import Image
from safetensors.torch import save_file

from vae_cli.cli import app

from .conftest import ROOT, TINY
from .imagegen import write


def test_train_writes_a_complete_run_dir(tiny_run):
    names = {p.name for p in tiny_run.iterdir()}
    assert {"recipe.yaml", "metrics.csv", "model.safetensors", "samples.png"} <= names
    assert not [n for n in names if n.endswith(".tmp")]
    rows = list(csv.DictReader(open(tiny_run / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    saved = yaml.safe_load((tiny_run / "recipe.yaml").read_text())
    assert saved["name"] == "tiny" and saved["train"]["epochs"] == 2
    with Image.open(tiny_run / "samples.png") as im:
        assert im.size[0] > 8 and im.getextrema() != (0, 0)


def test_train_json_and_auto_increment(tmp_path, runner):
    args = ["train", str(TINY), "--out", str(tmp_path), "--device", "cpu", "--json", "-q", "epochs=1"]
    first = runner.invoke(app, args)
    second = runner.invoke(app, args)
    assert first.exit_code == 0 and second.exit_code == 0, first.output + second.output
    a, b = json.loads(first.stdout), json.loads(second.stdout)
    assert a["run_dir"].endswith("tiny") and b["run_dir"].endswith("tiny-2")
    assert 0.0 <= a["test"]["accuracy"] <= 1.0 and a["epochs"] == 1
    assert first.stderr == ""  # --quiet


def test_progress_goes_to_stderr_and_results_to_stdout(tmp_path, runner):
    res = runner.invoke(app, ["train", str(TINY), "--out", str(tmp_path), "--device", "cpu", "epochs=1"])
    assert res.exit_code == 0, res.output
    assert "epoch 1/1" in res.stderr and "epoch 1/1" not in res.stdout
    assert "test accuracy" in res.stdout


def test_eval_json(tiny_run, runner):
    res = runner.invoke(app, ["eval", str(tiny_run / "model.safetensors"), "--json", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert {"elbo", "recon", "kl", "accuracy", "per_class", "confusion_matrix"} <= set(out)
    cm = out["confusion_matrix"]
    assert len(cm) == 10 and sum(map(sum, cm)) == out["n"]
    assert out["elbo"] == pytest.approx(-(out["recon"] + out["kl"]), rel=1e-5)


def test_eval_table(tiny_run, runner):
    res = runner.invoke(app, ["eval", str(tiny_run / "model.safetensors")])
    assert res.exit_code == 0 and "confusion matrix" in res.stdout and "per class" in res.stdout


def test_sample_grid_each_and_class(tiny_run, runner, tmp_path):
    w = str(tiny_run / "model.safetensors")
    res = runner.invoke(app, ["sample", w, "-n", "9", "--class", "3", "-o", str(tmp_path / "g.png"),
                              "--each", str(tmp_path / "each"), "--json"])
    assert res.exit_code == 0, res.output
    assert len(json.loads(res.stdout)["written"]) == 10
    with Image.open(tmp_path / "g.png") as im:
        assert im.size == ((3 * 9 + 1) * 12,) * 2  # 3x3 tiles of 8x8, 1-pixel padding, shown at 12x
    with Image.open(tmp_path / "each" / "sample-0000.png") as im:
        assert im.size == (8, 8)
    bad = runner.invoke(app, ["sample", w, "--class", "eleven", "-o", str(tmp_path / "x.png")])
    assert bad.exit_code == 2 and "not one of the model's classes" in bad.stderr


def test_sample_reconstruct(tiny_run, runner, tmp_path):
    w = str(tiny_run / "model.safetensors")
    res = runner.invoke(app, ["sample", w, "--reconstruct", "-n", "4", "-o", str(tmp_path / "r.png")])
    assert res.exit_code == 0, res.output
    with Image.open(tmp_path / "r.png") as im:
        assert im.size == ((4 * 9 + 1) * 12, (2 * 9 + 1) * 12)  # 2 rows of (input, reconstruction) x 2, 12x
    img = write(tmp_path / "in" / "a.png", "RGB", (40, 31))
    res = runner.invoke(app, ["sample", w, "--reconstruct", "--images", str(img), "-o", str(tmp_path / "s.png")])
    assert res.exit_code == 0, res.output


def test_classify_png_and_jpeg_grey_and_colour_odd_sizes(tiny_run, runner, tmp_path):
    files = [write(tmp_path / "imgs" / "g.png", "L", (13, 7)), write(tmp_path / "imgs" / "c.png", "RGB", (50, 64)),
             write(tmp_path / "imgs" / "j.jpg", "RGB", (31, 17)), write(tmp_path / "imgs" / "k.jpeg", "L", (8, 8)),
             write(tmp_path / "imgs" / "a.png", "RGBA", (100, 3))]
    w = str(tiny_run / "model.safetensors")
    res = runner.invoke(app, ["classify", w, str(tmp_path / "imgs"), "--top-k", "3", "--format", "json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    assert sorted(r["path"] for r in rows) == sorted(map(str, files))
    for r in rows:
        probs = [p["prob"] for p in r["top"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0 + 1e-6
    res = runner.invoke(app, ["classify", w, str(files[0]), str(files[2]), "--format", "csv"])
    table = list(csv.reader(io.StringIO(res.stdout)))
    assert table[0] == ["path", "class", "prob"] and len(table) == 3
    assert table[1][1] in [str(i) for i in range(10)]


def test_classify_goes_on_past_bad_images(tiny_run, runner, tmp_path):
    good = write(tmp_path / "good.png", "L", (8, 8))
    (tmp_path / "bad.png").write_bytes(b"not a png")
    res = runner.invoke(app, ["classify", str(tiny_run / "model.safetensors"), str(good), str(tmp_path / "bad.png")])
    assert res.exit_code == 2
    assert "good.png" in res.stdout and "bad.png" in res.stderr and "1 of 2 images" in res.stderr


def test_info(tiny_run, runner):
    res = runner.invoke(app, ["info", str(tiny_run / "model.safetensors"), "--json"])
    meta = json.loads(res.stdout)
    assert meta["model"] == "vae" and meta["image_shape"] == [1, 8, 8] and meta["classes"][0] == "0"
    assert meta["recipe"]["train"]["epochs"] == 2 and "accuracy" in meta["metrics"]
    assert runner.invoke(app, ["info", "--defaults"]).stdout.startswith("name:")
    assert "vae" in runner.invoke(app, ["info", "--models"]).stdout


@pytest.mark.parametrize("args, code, message", [
    (["train", "recipes/nope.yaml"], 2, "not found"),
    (["train", str(TINY), "model.latnt_dim=3"], 2, "did you mean 'model.latent_dim'?"),
    (["train", str(TINY), "train.epochs=-1"], 2, "must be >= 1"),
    (["train", str(TINY), "model.name=vea"], 2, "did you mean 'vae'?"),
    (["eval", "missing.safetensors"], 2, "not found"),
    (["info", "missing.safetensors"], 2, "not found"),
    (["classify", "missing.safetensors", "x.png"], 2, "does not exist"),
    (["sample", "missing.safetensors", "-o", "x.jpg"], 2, "must end in .png"),
    (["info"], 2, "give a weights file"),
])
def test_bad_input_one_line_and_exit_code(runner, tmp_path, args, code, message):
    res = runner.invoke(app, args)
    assert res.exit_code == code, res.output
    assert message in res.stderr and "Traceback" not in res.output
    assert len(res.stderr.strip().splitlines()) == 1


def test_foreign_and_damaged_weights(runner, tmp_path, tiny_run):
    import torch

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign), metadata={"framework": "other"})
    res = runner.invoke(app, ["eval", str(foreign)])
    assert res.exit_code == 2 and "not a vae weights file" in res.stderr
    data = (tiny_run / "model.safetensors").read_bytes()
    for name, blob in [("trunc.safetensors", data[: len(data) // 2]), ("junk.safetensors", b"\x00" * 100)]:
        (tmp_path / name).write_bytes(blob)
        res = runner.invoke(app, ["classify", str(tmp_path / name), str(write(tmp_path / "a.png", "L", (8, 8)))])
        assert res.exit_code == 2 and ("not a readable safetensors" in res.stderr
                                       or "do not fit" in res.stderr), res.stderr


def test_help_does_not_import_torch():
    code = "import sys; from vae_cli.cli import app; sys.argv=['vae','--help'];\n" \
           "try: app()\nexcept SystemExit: pass\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip().splitlines()[-1] == "False", out.stdout + out.stderr
    from vae_cli.cli import app

    commands = [c.name or c.callback.__name__ for c in app.registered_commands]
    assert {"train", "eval", "plot", "sample", "classify", "info"} <= set(commands)
    for cmd in commands:
        code = f"import sys; from vae_cli.cli import app; sys.argv=['vae','{cmd}','--help'];\n" \
               "try: app()\nexcept SystemExit: pass\nprint('torch' in sys.modules)"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
        assert out.stdout.strip().splitlines()[-1] == "False", cmd


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "vae_cli", "--version"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.startswith("vae ")
