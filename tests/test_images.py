from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from vae_cli.core.errors import ImageError, UsageError
from vae_cli.data.images import expand_paths, load_image

from .imagegen import write


@pytest.mark.parametrize("name, mode", [("g.png", "L"), ("c.png", "RGB"), ("a.png", "RGBA"), ("p.png", "P"),
                                        ("w.png", "I;16"), ("j.jpg", "L"), ("k.jpg", "RGB"), ("m.jpg", "CMYK"),
                                        ("la.png", "LA")])
@pytest.mark.parametrize("channels", [1, 3])
def test_any_mode_becomes_the_model_shape(tmp_path, name, mode, channels):
    path = write(tmp_path / name, mode, (37, 23))
    arr = load_image(path, channels, (8, 8))
    assert arr.shape == (channels, 8, 8) and arr.dtype == np.float32
    assert arr.min() >= 0.0 and arr.max() <= 1.0
    # the white stroke survives the conversion: the centre is brighter than the border
    assert arr[:, 2:6, 3:5].mean() > arr[:, :, 0].mean() + 0.2


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "w.png"
    Image.fromarray(np.full((4, 4), 30000, np.uint16)).save(path)
    arr = load_image(path, 1, (4, 4))
    assert arr.mean() == pytest.approx(30000 / 65535, abs=0.01)


@pytest.mark.parametrize("content, message", [
    (b"", "is not an image"),
    (b"hello, I am text", "is not an image"),
])
def test_bad_files_name_the_file(tmp_path, content, message):
    p = tmp_path / "bad.png"
    p.write_bytes(content)
    with pytest.raises(ImageError) as e:
        load_image(p, 1, (8, 8))
    assert message in str(e.value) and "bad.png" in str(e.value)


def test_truncated_png(tmp_path):
    good = write(tmp_path / "g.png", "RGB", (64, 64))
    data = good.read_bytes()
    (tmp_path / "t.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="t.png"):
        load_image(tmp_path / "t.png", 1, (8, 8))


def test_expand_paths(tmp_path):
    a = write(tmp_path / "x" / "a.png", "L", (9, 9))
    b = write(tmp_path / "x" / "sub" / "b.jpg", "RGB", (9, 9))
    (tmp_path / "x" / "notes.txt").write_text("skip me")
    assert expand_paths([str(tmp_path / "x")]) == [a, b]
    assert expand_paths([str(tmp_path / "x" / "*.png"), str(a)]) == [a]
    with pytest.raises(UsageError, match="does not exist"):
        expand_paths([str(tmp_path / "nope.png")])
    with pytest.raises(UsageError, match="matches no files"):
        expand_paths([str(tmp_path / "*.gif")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="holds no images"):
        expand_paths([str(tmp_path / "empty")])
