"""Experiment trackers beside metrics.csv (`train.loggers`): TensorBoard event files in the run folder
and an MLflow run. Each is an optional extra, imported only when the recipe asks for it; a missing one
stops the run before training with the install command. Rank 0 alone logs.

TensorBoard (run/tensorboard/): every numeric column of metrics.csv as a scalar per epoch, the resolved
recipe as text, and at the end the run's pictures (samples, reconstructions, ...) as images and the
final test numbers as `final/...` scalars.

MLflow (MLFLOW_TRACKING_URI, else ./mlruns as a local file store; MLflow 3 keeps that store only behind
MLFLOW_ALLOW_FILE_STORE=true, which is set for a file: URI unless the user set it): experiment = the recipe's
name, run = the run folder's name; params = the flattened recipe (`model.latent_dim`), metrics per epoch, and
at the end the weights file, report.html, metrics.csv and the pictures as artifacts. A resumed run continues
the same MLflow run (its id is kept in the run folder).

A tracker that fails, at start-up (a tracking server that does not answer, an unwritable store) or mid-run
(a server gone away), is reported in one line on stderr and switched off: the training and its files
(metrics.csv above all) matter more than the dashboard. MLflow's HTTP client retries for minutes by
default; here a request waits `MLFLOW_TIMEOUTS` (seconds, one retry) unless the user set those variables.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from vae_cli.artifacts.rundir import RunDir
from vae_cli.core.console import Reporter
from vae_cli.core.errors import UsageError
from vae_cli.core.recipe import Recipe

MLFLOW_ID_FILE = "mlflow-run-id.txt"
# MLflow's own defaults (7 retries, 2x back-off, 120 s timeout) keep a run waiting ~4 minutes on a dead server
MLFLOW_TIMEOUTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                   "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}


def _numeric(row: dict[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in row.items():
        if k == "epoch" or isinstance(v, bool):
            continue
        try:
            out[k] = float(v)
        except (TypeError, ValueError):
            continue
    return out


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v) if isinstance(v, (list, tuple)) else str(v)
    return out


class TensorBoard:
    def __init__(self, recipe: Recipe, run: RunDir, resumed: bool) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UsageError("train.loggers has tensorboard, which needs: pip install 'vae-cli[tensorboard]'") from None
        import yaml

        self.dir = run.root / "tensorboard"
        self.writer = SummaryWriter(log_dir=str(self.dir))
        self.last_epoch = 0
        if not resumed:
            text = yaml.safe_dump(recipe.to_dict(), sort_keys=False)
            self.writer.add_text("recipe", "    " + text.replace("\n", "\n    "), 0)  # markdown code block

    def epoch(self, row: dict[str, Any]) -> None:
        self.last_epoch = int(row["epoch"])
        for k, v in _numeric(row).items():
            self.writer.add_scalar(k, v, self.last_epoch)
        self.writer.flush()

    def finish(self, run: RunDir, pictures: dict[str, str], test: dict[str, Any]) -> None:
        import numpy as np
        from PIL import Image

        for key, path in pictures.items():
            if str(path).endswith(".png") and Path(path).is_file():
                with Image.open(path) as im:
                    self.writer.add_image(key, np.asarray(im.convert("RGB")), self.last_epoch, dataformats="HWC")
        for k in ("accuracy", "elbo", "recon", "kl", "macro_f1", "ece"):
            if isinstance(test.get(k), (int, float)):
                self.writer.add_scalar(f"final/{k}", float(test[k]), self.last_epoch)
        self.close()

    def close(self) -> None:
        self.writer.close()


class MLflow:
    def __init__(self, recipe: Recipe, run: RunDir, resumed: bool) -> None:
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise UsageError("train.loggers has mlflow, which needs: pip install 'vae-cli[mlflow]'") from None
        uri = os.environ.get("MLFLOW_TRACKING_URI") or (Path.cwd() / "mlruns").resolve().as_uri()
        if uri.startswith("file:"):  # MLflow 3 refuses its file store unless asked for; the local default
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        for k, v in MLFLOW_TIMEOUTS.items():
            os.environ.setdefault(k, v)
        self.client = MlflowClient(tracking_uri=uri)
        self.uri = uri
        id_file = run.root / MLFLOW_ID_FILE
        if resumed and id_file.is_file():
            self.run_id = id_file.read_text().strip()
            self.client.update_run(self.run_id, status="RUNNING")
            return
        name = recipe.name or "vae"
        exp = self.client.get_experiment_by_name(name)
        exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(name)
        self.run_id = self.client.create_run(exp_id, run_name=run.root.name).info.run_id
        from mlflow.entities import Param

        params = [Param(k, v[:500]) for k, v in flatten(recipe.to_dict()).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])
        from vae_cli.core.fsutil import write_text

        write_text(id_file, self.run_id + "\n")

    def epoch(self, row: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        now, step = int(time.time() * 1000), int(row["epoch"])
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in _numeric(row).items()])

    def finish(self, run: RunDir, pictures: dict[str, str], test: dict[str, Any]) -> None:
        for k in ("accuracy", "elbo", "recon", "kl", "macro_f1", "ece"):
            if isinstance(test.get(k), (int, float)):
                self.client.log_metric(self.run_id, f"test_{k}", float(test[k]))
        for path in (run.weights, run.root / "report.html", run.metrics):
            if Path(path).is_file():
                self.client.log_artifact(self.run_id, str(path))
        for path in pictures.values():
            if Path(path).is_file():
                self.client.log_artifact(self.run_id, str(path), "pictures")
        self.client.set_terminated(self.run_id, "FINISHED")

    def close(self) -> None:
        self.client.set_terminated(self.run_id, "KILLED")


TRACKERS = {"tensorboard": TensorBoard, "mlflow": MLflow}
EXTRAS = {"tensorboard": "torch.utils.tensorboard", "mlflow": "mlflow.tracking"}


def require(names: tuple[str, ...]) -> None:
    """Fail before any work when a tracker the recipe names is not installed."""
    import importlib

    for name in names:
        if name in EXTRAS:
            try:
                importlib.import_module(EXTRAS[name])
            except ImportError:
                raise UsageError(f"train.loggers has {name}, which needs: pip install 'vae-cli[{name}]'") from None


class Trackers:
    """The recipe's trackers behind one interface; a failing one is reported once and switched off."""

    def __init__(self, recipe: Recipe, run: RunDir, resumed: bool, reporter: Reporter) -> None:
        self.reporter = reporter
        self.active = {}
        for n in (n for n in recipe.train.loggers if n in TRACKERS):
            try:
                self.active[n] = TRACKERS[n](recipe, run, resumed)
            except UsageError:  # not installed: the install command, before any work
                raise
            except Exception as e:  # noqa: BLE001  (reported; the run goes on with metrics.csv)
                self._failed(n, e, "at start-up")
        if "mlflow" in self.active:
            reporter.log(f"mlflow: run {self.active['mlflow'].run_id} at {self.active['mlflow'].uri}")

    def _failed(self, name: str, e: Exception, when: str) -> None:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        self.reporter.log(f"warning: the {name} logger failed {when} ({type(e).__name__}: {first}); it is "
                          f"switched off for this run (metrics.csv is written as always)")

    def _each(self, method: str, *args) -> None:
        for name, t in list(self.active.items()):
            try:
                getattr(t, method)(*args)
            except Exception as e:  # noqa: BLE001  (reported, then that tracker is off; training goes on)
                self._failed(name, e, "mid-run")
                del self.active[name]

    def epoch(self, row: dict[str, Any]) -> None:
        self._each("epoch", row)

    def finish(self, run: RunDir, pictures: dict[str, str], test: dict[str, Any]) -> None:
        self._each("finish", run, pictures, test)
        self.active.clear()

    def close(self) -> None:
        """After a failure or interrupt: mark what is still open as ended."""
        self._each("close")
        self.active.clear()
