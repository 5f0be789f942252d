"""Tables of per-image vectors (`vae embed`): .npy with a paths file beside it, .csv, or .parquet, each
written batch by batch into a temporary file and renamed into place only when complete."""

from __future__ import annotations

import contextlib
import csv
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from torch import Tensor

from vae_cli.core.errors import UsageError
from vae_cli.core.fsutil import atomic_path

Write = Callable[[list[str], Tensor, Tensor], None]


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
    with atomic_path(path) as tmp:
        if suffix == ".csv":
            with open(tmp, "w", newline="", encoding="utf-8") as f:
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
                    pw.write_table(pa.table({"path": paths, **{n: rows[:, i] for i, n in enumerate(names)}},
                                            schema=schema))
                yield write
        else:
            yield from _npy(tmp, path, dim * (2 if logvar else 1), logvar)


def _npy(tmp: Path, final: Path, cols: int, logvar: bool) -> Iterator[Write]:
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
    with atomic_path(final.with_name(final.name[:-len(final.suffix)] + ".paths.txt")) as ptmp:
        ptmp.write_text("".join(p + "\n" for p in names), encoding="utf-8")
