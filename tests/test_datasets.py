"""Real datasets: image folders built from real PNG/JPEG files, torchvision MNIST from real IDX files."""

from __future__ import annotations

import gzip
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from vae_cli.core.errors import DataError
from vae_cli.core.recipe import DataConfig
from vae_cli.data import build_dataset

from .imagegen import write

SHARED_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


def _folder(root: Path, split: str | None, counts=(("cat", 6), ("dog", 5), ("eel", 4))) -> Path:
    base = root / split if split else root
    for ci, (name, n) in enumerate(counts):
        for i in range(n):
            mode = "RGB" if (i + ci) % 2 else "L"
            ext = ".jpg" if i % 3 == 0 else ".png"
            write(base / name / f"{i}{ext}", mode, (17 + i * 3, 29 - i), seed=i)
    return root


def test_folder_with_train_and_test(tmp_path):
    _folder(tmp_path, "train")
    _folder(tmp_path, "test", (("cat", 2), ("dog", 2), ("eel", 1)))
    d = build_dataset(DataConfig(name="folder", root=str(tmp_path), image_size=12, holdout_fraction=0), seed=0)
    assert d.classes == ["cat", "dog", "eel"]
    assert d.train_x.shape == (15, 3, 12, 12) and d.test_x.shape == (5, 3, 12, 12)  # colour present -> 3
    assert np.bincount(d.train_y.numpy()).tolist() == [6, 5, 4]
    assert float(d.train_x.min()) >= 0 and float(d.train_x.max()) <= 1


def test_folder_val_split_and_grey_override(tmp_path):
    _folder(tmp_path, "train")
    _folder(tmp_path, "val", (("cat", 1), ("dog", 1), ("eel", 1)))
    d = build_dataset(DataConfig(name="folder", root=str(tmp_path), channels=1), seed=0)
    assert d.train_x.shape[1:] == (1, 32, 32) and len(d.test_x) == 3


def test_folder_without_splits_holds_out_a_seeded_fraction(tmp_path):
    _folder(tmp_path, None, (("a", 10), ("b", 10)))
    cfg = DataConfig(name="folder", root=str(tmp_path), image_size=8, test_fraction=0.2)
    d1, d2 = build_dataset(cfg, 0), build_dataset(cfg, 7)
    assert len(d1.test_x) == 4 and np.bincount(d1.test_y.numpy()).tolist() == [2, 2]
    assert np.array_equal(d1.test_x.numpy(), d2.test_x.numpy())  # the split does not move with the seed


def test_folder_labels_per_class(tmp_path):
    _folder(tmp_path, "train")
    _folder(tmp_path, "test", (("cat", 1), ("dog", 1), ("eel", 1)))
    d = build_dataset(DataConfig(name="folder", root=str(tmp_path), image_size=8, labels_per_class=2), 3)
    assert np.bincount(d.train_y[d.labelled].numpy()).tolist() == [2, 2, 2]


@pytest.mark.parametrize("setup, message", [
    ("missing", "is not a folder"),
    ("no-classes", "no class folders"),
    ("empty-class", "every class folder needs at least one image"),
    ("bad-image", "broken.png"),
    ("class-mismatch", "class folders differ"),
])
def test_folder_errors(tmp_path, setup, message):
    root = tmp_path / "imgs"
    if setup != "missing":
        root.mkdir()
    if setup == "empty-class":
        _folder(root, None, (("a", 2),))
        (root / "b").mkdir()
    if setup == "bad-image":
        _folder(root, None, (("a", 2),))
        (root / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    if setup == "class-mismatch":
        _folder(root, "train", (("a", 2), ("b", 2)))
        _folder(root, "test", (("a", 1), ("c", 1)))
    with pytest.raises(DataError) as e:
        build_dataset(DataConfig(name="folder", root=str(root)), 0)
    assert message in str(e.value)


def _idx(path: Path, arr: np.ndarray, labels: bool) -> None:
    header = struct.pack(">HBB", 0, 8, arr.ndim) + b"".join(struct.pack(">I", d) for d in arr.shape)
    path.write_bytes(header + arr.astype(np.uint8).tobytes())


def mnist_idx_root(root):
    """A torchvision MNIST root with real (uncompressed) IDX files: 30 training and 10 test images."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.RandomState(0)
    _idx(raw / "train-images-idx3-ubyte", rng.randint(0, 256, (30, 28, 28)), False)
    _idx(raw / "train-labels-idx1-ubyte", np.arange(30) % 10, True)
    _idx(raw / "t10k-images-idx3-ubyte", rng.randint(0, 256, (10, 28, 28)), False)
    _idx(raw / "t10k-labels-idx1-ubyte", np.arange(10), True)
    return root


def test_torchvision_mnist_layout_from_real_idx_files(tmp_path):
    mnist_idx_root(tmp_path)
    d = build_dataset(DataConfig(name="mnist", root=str(tmp_path), holdout_fraction=0), 0)
    assert d.train_x.shape == (30, 1, 28, 28) and d.test_x.shape == (10, 1, 28, 28)
    assert len(d.classes) == 10 and d.train_y.tolist()[:3] == [0, 1, 2]
    resized = build_dataset(DataConfig(name="mnist", root=str(tmp_path), image_size=14, channels=3,
                                       holdout_fraction=0), 0)
    assert resized.train_x.shape == (30, 3, 14, 14)


def test_missing_torchvision_dataset_says_where_to_put_files(tmp_path):
    with pytest.raises(DataError) as e:
        build_dataset(DataConfig(name="fashion-mnist", root=str(tmp_path)), 0)
    assert f"{tmp_path}/FashionMNIST/raw/" in str(e.value) and "data.download=true" in str(e.value)


@pytest.mark.skipif(not SHARED_MNIST.is_dir(), reason="no ../shared/data/mnist")
def test_real_mnist_gz_files_offline(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for f in SHARED_MNIST.glob("*.gz"):
        shutil.copy(f, raw / f.name)
    d = build_dataset(DataConfig(name="mnist", root=str(tmp_path), labels_per_class=10, holdout_fraction=0), seed=0)
    assert d.train_x.shape == (60000, 1, 28, 28) and len(d.test_x) == 10000 and len(d.labelled) == 100
    with gzip.open(raw / "t10k-labels-idx1-ubyte.gz") as f:
        assert d.test_y[:5].tolist() == list(f.read()[8:13])


def test_failed_download_says_where_to_put_the_files(tmp_path, monkeypatch):
    """data.download=true on a machine without network: torchvision's real download path, with the
    network call failing as it does offline."""
    import urllib.error

    import torchvision.datasets.mnist as tv_mnist

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(tv_mnist, "download_and_extract_archive", offline)
    with pytest.raises(DataError) as e:
        build_dataset(DataConfig(name="kmnist", root=str(tmp_path), download=True), 0)
    assert "downloading kmnist failed" in str(e.value) and f"{tmp_path}/KMNIST/raw/" in str(e.value)


def test_cifar10_binary_version_without_pickle(tmp_path):
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    rng = np.random.RandomState(0)
    for name, n in [*((f"data_batch_{i}.bin", 4) for i in range(1, 6)), ("test_batch.bin", 3)]:
        labels = (np.arange(n) % 10).astype(np.uint8)[:, None]
        pixels = rng.randint(0, 256, (n, 3072)).astype(np.uint8)
        (folder / name).write_bytes(np.concatenate([labels, pixels], 1).tobytes())
    d = build_dataset(DataConfig(name="cifar10", root=str(tmp_path), holdout_fraction=0), 0)
    assert d.train_x.shape == (20, 3, 32, 32) and d.test_x.shape == (3, 3, 32, 32)
    assert d.classes[0] == "airplane" and d.train_y[:4].tolist() == [0, 1, 2, 3]
    raw = (folder / "test_batch.bin").read_bytes()
    assert abs(float(d.test_x[0, 0, 0, 0]) - raw[1] / 255.0) < 1e-6  # first red pixel of the first image
    grey = build_dataset(DataConfig(name="cifar10", root=str(tmp_path), channels=1, image_size=16,
                                    holdout_fraction=0), 0)
    assert grey.train_x.shape == (20, 1, 16, 16)
    (folder / "test_batch.bin").write_bytes(raw[:-5])
    with pytest.raises(DataError, match="truncated"):
        build_dataset(DataConfig(name="cifar10", root=str(tmp_path), holdout_fraction=0), 0)


def test_cifar10_pickle_version_is_refused_with_a_hint(tmp_path):
    (tmp_path / "cifar-10-batches-py").mkdir()
    with pytest.raises(DataError, match="vae never unpickles"):
        build_dataset(DataConfig(name="cifar10", root=str(tmp_path), holdout_fraction=0), 0)
