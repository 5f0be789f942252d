"""Tables of per-image vectors (`vae embed`): .npy with a paths file beside it, .csv, or .parquet, each
written batch by batch into a temporary file and renamed into place only when complete.

File names are kept byte for byte: a name that is not UTF-8 (Linux allows any bytes but `/` and NUL) is
written as its own bytes (Python's surrogateescape, as the rest of the tool reads names). In the paths file
one line is one path; a name a line cannot hold (a line break in it) or that starts with a double quote is
written as a quoted JSON string, as git quotes unusual names. `read_paths` reads both back."""

from __future__ import annotations

import contextlib
import csv
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from torch import Tensor

from vae_cli.core.errors import UsageError
from vae_cli.core.fsutil import atomic_path, atomic_paths

Write = Callable[[list[str], Tensor, Tensor], None]


def _line(name: str) -> str:
    plain = not name.startswith('"') and "\n" not in name and "\r" not in name
    return name if plain else json.dumps(name)


def write_paths(path: Path, names: list[str]) -> None:
    """The paths file: one line per row of the matrix, in order (see the module's docstring)."""
    with open(path, "w", encoding="utf-8", errors="surrogateescape", newline="\n") as f:
        f.writelines(_line(n) + "\n" for n in names)


def read_paths(path: str | Path) -> list[str]:
    """The names `write_paths` wrote, exactly (non-UTF-8 bytes come back as surrogateescape characters, so
    `os.fsencode` gives the original bytes)."""
    with open(path, encoding="utf-8", errors="surrogateescape", newline="\n") as f:
        lines = f.read().split("\n")[:-1]
    return [json.loads(line) if line.startswith('"') else line for line in lines]


def paths_file(path: Path) -> Path:
    """FILE.paths.txt beside FILE.npy."""
    return path.with_name(path.name[:-len(path.suffix)] + ".paths.txt")


def columns(dim: int, logvar: bool) -> list[str]:
    return [f"z{i}" for i in range(dim)] + ([f"logvar{i}" for i in range(dim)] if logvar else [])


def _rows(mean: Tensor, logvar: Tensor, with_logvar: bool) -> np.ndarray:
    m = mean.float().numpy()
    return np.concatenate([m, logvar.float().numpy()], 1) if with_logvar else m


@contextlib.contextmanager
def embedding_writer(path: Path, dim: int, logvar: bool) -> Iterator[Write]:
    """Yields write(paths, mean, logvar) for one batch at a time. .npy: a float32 (N, dim) array, or
    (N, 2*dim) with the log-variances after the means, and PATH.paths.txt with one image path per row
    (npy holds no strings without pickling); .csv and .parquet: a `path` column then z0.. (logvar0..)."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise UsageError("writing .parquet needs pyarrow: pip install 'vae-cli[parquet]' "
                             "(or write .npy or .csv)") from None
    if suffix not in (".csv", ".parquet"):
        with atomic_paths([path, paths_file(path)]) as (tmp, ptmp):
            yield from _npy(tmp, ptmp, dim * (2 if logvar else 1), logvar)
        return
    with atomic_path(path) as tmp:
        if suffix == ".csv":
            with open(tmp, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
                w = csv.writer(f)
                w.writerow(["path", *columns(dim, logvar)])
                yield lambda paths, mu, lv: w.writerows(
                    [p, *(f"{v:.7g}" for v in row)] for p, row in zip(paths, _rows(mu, lv, logvar).tolist()))
        elif suffix == ".parquet":
            names = columns(dim, logvar)
            schema = pa.schema([("path", pa.string()), *((n, pa.float32()) for n in names)])
            with pq.ParquetWriter(str(tmp), schema) as pw:
                def write(paths, mu, lv):
                    rows = _rows(mu, lv, logvar)
                    # parquet strings are UTF-8: a name that is not is written with \x escapes
                    paths = [p.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace") for p in paths]
                    pw.write_table(pa.table({"path": paths, **{n: rows[:, i] for i, n in enumerate(names)}},
                                            schema=schema))
                yield write


def _npy(tmp: Path, ptmp: Path, cols: int, logvar: bool) -> Iterator[Write]:
    raw, names = tmp.with_suffix(".raw"), []
    with open(raw, "wb") as f:
        def write(paths, mu, lv):
            f.write(np.ascontiguousarray(_rows(mu, lv, logvar), dtype="<f4").tobytes())
            names.extend(paths)
        yield write
    n = len(names)
    data = np.memmap(raw, "<f4", "r", shape=(n, cols)) if n else np.zeros((0, cols), "<f4")
    np.save(tmp, data)  # streams from the mapped file, however large
    del data
    raw.unlink()
    write_paths(ptmp, names)
