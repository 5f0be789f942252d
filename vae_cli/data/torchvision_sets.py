"""torchvision datasets (MNIST family, SVHN) and CIFAR-10, decoded once into arrays.

`data.root` follows torchvision's layout (`<root>/MNIST/raw/*.gz`, `<root>/train_32x32.mat`), so a root
users already have works as it is. MNIST-style roots that hold only the original `.gz` files are unpacked
in place without touching the network.

CIFAR-10 is the exception: torchvision reads the Python version of it with `pickle`, and this tool never
unpickles. It reads the official *binary* version instead (`<root>/cifar-10-batches-bin/*.bin`, from
cifar-10-binary.tar.gz, downloaded there with `data.download: true`): fixed-size records of one label
byte and 3,072 pixel bytes.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from vae_cli.core.errors import DataError
from vae_cli.data.base import register_dataset

# name -> (torchvision class name, how its files sit under root, what a user should put there)
SOURCES = {
    "mnist": ("MNIST", "{root}/MNIST/raw/", "train-images-idx3-ubyte.gz and the other 3 MNIST .gz files"),
    "fashion-mnist": ("FashionMNIST", "{root}/FashionMNIST/raw/", "the 4 Fashion-MNIST .gz files"),
    "kmnist": ("KMNIST", "{root}/KMNIST/raw/", "the 4 KMNIST .gz files"),
    "svhn": ("SVHN", "{root}/", "train_32x32.mat and test_32x32.mat"),
}


def _mnist_gz_present(cls, root: str) -> bool:
    resources = getattr(cls, "resources", None)
    raw = Path(root) / cls.__name__ / "raw"
    return bool(resources) and all((raw / os.path.basename(url)).is_file() for url, _ in resources)


def _raw_files_only(cls):
    """torchvision's MNIST family prefers an old `processed/*.pt` cache over the raw IDX files when one
    exists, and reads it with torch.load. A root (from a recipe, or a weights file's recipe) must never make
    this tool unpickle, so the cache is never looked at: the same class, under the same name (its folders
    are named after the class), with that check answering no."""
    if not hasattr(cls, "_check_legacy_exist"):
        return cls
    return type(cls.__name__, (cls,), {"_check_legacy_exist": lambda self: False})


def _open(name: str, cfg, train: bool):
    import torchvision.datasets as tvd

    cls_name, where, what = SOURCES[name]
    cls = _raw_files_only(getattr(tvd, cls_name))
    root = os.path.expanduser(cfg.root)
    place = where.format(root=root)
    kwargs = {"split": "train" if train else "test"} if name == "svhn" else {"train": train}
    # The original .gz files alone are enough: torchvision's download step only unpacks them then.
    download = cfg.download or _mnist_gz_present(cls, root)
    try:
        return cls(root, download=download, **kwargs)
    except RuntimeError as e:
        text = str(e).lower()
        if "error downloading" in text:  # torchvision tried every mirror and failed
            raise DataError(f"downloading {name} failed ({str(e).splitlines()[0].strip()}); if this machine is "
                            f"offline, put {what} in '{place}' and run again") from None
        if "not found" in text or "corrupted" in text:
            raise DataError(f"{name} not found under '{place}': put {what} there, or set data.download=true "
                            f"(needs internet)") from None
        raise
    except OSError as e:  # URLError, socket errors, HTTP errors while downloading
        raise DataError(f"downloading {name} failed ({e}); if this machine is offline, put {what} "
                        f"in '{place}' and run again") from None


def _arrays(ds) -> tuple[np.ndarray, np.ndarray]:
    data = ds.data.numpy() if hasattr(ds.data, "numpy") else np.asarray(ds.data)
    labels = getattr(ds, "targets", None)
    labels = getattr(ds, "labels", None) if labels is None else labels
    labels = labels.numpy() if hasattr(labels, "numpy") else np.asarray(labels)
    if data.ndim == 3:  # (N, H, W) grey
        data = data[:, None]
    elif data.shape[-1] == 3:  # (N, H, W, 3) colour
        data = data.transpose(0, 3, 1, 2)
    return (data.astype(np.float32) / 255.0), labels.astype(np.int64)


def _builder(name: str):
    def build(cfg):
        train, test = _open(name, cfg, True), _open(name, cfg, False)
        tx, ty = _arrays(train)
        vx, vy = _arrays(test)
        classes = list(getattr(train, "classes", None) or [str(i) for i in range(int(ty.max()) + 1)])
        return tx, ty, vx, vy, classes

    build.__doc__ = f"torchvision {SOURCES[name][0]} from data.root"
    return build


for _name in SOURCES:
    register_dataset(_name)(_builder(_name))


CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR_RECORD = 1 + 3 * 32 * 32


def _cifar_batches(folder: Path, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    raw = b"".join((folder / n).read_bytes() for n in names)
    if len(raw) % CIFAR_RECORD:
        raise DataError(f"CIFAR-10 files in '{folder}' are truncated ({len(raw)} bytes is not a whole number "
                        f"of {CIFAR_RECORD}-byte records); download them again")
    rec = np.frombuffer(raw, np.uint8).reshape(-1, CIFAR_RECORD)
    return rec[:, 1:].reshape(-1, 3, 32, 32).astype(np.float32) / 255.0, rec[:, 0].astype(np.int64)


@register_dataset("cifar10")
def build_cifar10(cfg):
    """CIFAR-10 from the binary distribution under data.root (no pickle)."""
    root = Path(os.path.expanduser(cfg.root))
    folder = root / "cifar-10-batches-bin"
    train_names = [f"data_batch_{i}.bin" for i in range(1, 6)]
    names = [*train_names, "test_batch.bin"]
    if not all((folder / n).is_file() for n in names) and cfg.download:
        from torchvision.datasets.utils import download_and_extract_archive

        try:
            download_and_extract_archive(CIFAR_URL, str(root), md5=CIFAR_MD5)
        except OSError as e:
            raise DataError(f"downloading cifar10 failed ({e}); if this machine is offline, unpack "
                            f"cifar-10-binary.tar.gz into '{root}/'") from None
    if not all((folder / n).is_file() for n in names):
        hint = (" (found the Python/pickle version in cifar-10-batches-py; vae never unpickles, so it needs "
                "the binary version)") if (root / "cifar-10-batches-py").is_dir() else ""
        raise DataError(f"cifar10 not found under '{folder}/'{hint}: unpack cifar-10-binary.tar.gz into "
                        f"'{root}/', or set data.download=true (needs internet)")
    tx, ty = _cifar_batches(folder, train_names)
    vx, vy = _cifar_batches(folder, ["test_batch.bin"])
    return tx, ty, vx, vy, list(CIFAR_CLASSES)
