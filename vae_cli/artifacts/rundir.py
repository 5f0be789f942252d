"""The run folder: every file a training run writes, named once. `vae train` writes it, `vae plot` and
the report read it, the lock guards it.

    runs/NAME/
      recipe.yaml  metrics.csv  model.safetensors  last.safetensors  .lock
      samples.png  samples-by-class.png  reconstructions.png  interpolation.png
      latent-map.png  curves.png  confusion.png  report.html
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from vae_cli.core.errors import UsageError
from vae_cli.core.fsutil import TEMP_PREFIX

# picture key -> file name, in the order the report shows them
PICTURES = {
    "samples": "samples.png",
    "samples_by_class": "samples-by-class.png",
    "reconstructions": "reconstructions.png",
    "interpolation": "interpolation.png",
    "latent_map": "latent-map.png",
    "curves": "curves.png",
    "confusion": "confusion.png",
}


@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def recipe(self) -> Path:
        return self.root / "recipe.yaml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.csv"

    @property
    def weights(self) -> Path:
        return self.root / "model.safetensors"

    @property
    def state(self) -> Path:
        return self.root / "last.safetensors"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    @property
    def report(self) -> Path:
        return self.root / "report.html"

    def picture(self, key: str) -> Path:
        return self.root / PICTURES[key]

    @property
    def samples(self) -> Path:
        return self.picture("samples")

    def files(self) -> dict[str, Path]:
        """The files a finished run holds, by key (the `paths` of `vae train --json`)."""
        return {"run_dir": self.root, "recipe": self.recipe, "metrics": self.metrics, "weights": self.weights,
                "state": self.state, "samples": self.samples}

    @classmethod
    def of_weights(cls, weights: Path) -> RunDir:
        """The run folder a weights file sits in (its metrics.csv may or may not be there)."""
        return cls(Path(weights).parent)

    @classmethod
    def create(cls, out: str | Path, name: str, exist_ok: bool) -> RunDir:
        """runs/<name>, or the first free runs/<name>-2, -3, ... unless exist_ok."""
        out = Path(out)
        if not name or name in (".", "..") or "/" in name or os.sep in name:
            raise UsageError(f"run name '{name}' is not a plain folder name; pass --name NAME")
        try:
            out.mkdir(parents=True, exist_ok=True)
            candidate, i = out / name, 1
            while not exist_ok:
                try:
                    candidate.mkdir()
                    return cls(candidate)
                except FileExistsError:
                    i += 1
                    candidate = out / f"{name}-{i}"
            candidate.mkdir(exist_ok=True)
            return cls(candidate)
        except (NotADirectoryError, PermissionError, FileExistsError) as e:
            raise UsageError(f"cannot create run folder under '{out}' ({e.strerror or e}); "
                             f"pick another --out") from None

    def remove_stale_temp_files(self) -> None:
        """Temp folders (and the older temp files) of writes that a crash interrupted; the real files are
        untouched by design. Called with the run's lock held, so no live writer owns them."""
        for tmp in self.root.glob(f"{TEMP_PREFIX}*"):
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() and not tmp.is_symlink() else tmp.unlink()
        for tmp in self.root.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)

    def remove_if_unused(self) -> None:
        """Remove the folder when it holds nothing but the lock and temp folders (a run that failed before
        writing anything), so the next run gets the same name instead of NAME-2."""
        try:
            entries = list(self.root.iterdir())
        except OSError:
            return
        if all(e.name == ".lock" or e.name.startswith(TEMP_PREFIX) for e in entries):
            for e in entries:
                shutil.rmtree(e, ignore_errors=True) if e.is_dir() and not e.is_symlink() else e.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                self.root.rmdir()
