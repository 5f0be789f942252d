"""torchvision datasets (MNIST family, CIFAR-10, SVHN) decoded once into arrays.

`data.root` follows torchvision's layout (`<root>/MNIST/raw/*.gz`, `<root>/cifar-10-batches-py`,
`<root>/train_32x32.mat`), so a root users already have works as it is. MNIST-style roots that hold only
the original `.gz` files are unpacked in place without touching the network.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from vae_cli.data import register_dataset
from vae_cli.errors import DataError

# name -> (torchvision class name, how its files sit under root, what a user should put there)
SOURCES = {
    "mnist": ("MNIST", "{root}/MNIST/raw/", "train-images-idx3-ubyte.gz and the other 3 MNIST .gz files"),
    "fashion-mnist": ("FashionMNIST", "{root}/FashionMNIST/raw/", "the 4 Fashion-MNIST .gz files"),
    "kmnist": ("KMNIST", "{root}/KMNIST/raw/", "the 4 KMNIST .gz files"),
    "cifar10": ("CIFAR10", "{root}/", "cifar-10-python.tar.gz (or its cifar-10-batches-py folder)"),
    "svhn": ("SVHN", "{root}/", "train_32x32.mat and test_32x32.mat"),
}


def _mnist_gz_present(cls, root: str) -> bool:
    resources = getattr(cls, "resources", None)
    raw = Path(root) / cls.__name__ / "raw"
    return bool(resources) and all((raw / os.path.basename(url)).is_file() for url, _ in resources)


def _open(name: str, cfg, train: bool):
    import torchvision.datasets as tvd

    cls_name, where, what = SOURCES[name]
    cls = getattr(tvd, cls_name)
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
