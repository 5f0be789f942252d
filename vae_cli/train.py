"""The training loop: data in memory, batches by slicing, autocast set up once, AdamW with cosine decay,
KL warm-up, gradient clipping; then the classifier stage, the evaluation and the run directory's files.
"""

from __future__ import annotations

import csv
import io
import math
import os
import time
import warnings
from pathlib import Path

import torch
import yaml

from vae_cli import checkpoint, fsutil, pictures
from vae_cli.augment import augment
from vae_cli.console import Reporter
from vae_cli.data import Dataset, build_dataset
from vae_cli.errors import UsageError, VaeError
from vae_cli.evaluate import evaluate
from vae_cli.models import build_model
from vae_cli.models.base import Batch
from vae_cli.recipe import Recipe
from vae_cli.runtime import Runtime, resolve, seed_everything

# Per-epoch numbers in metrics.csv use the first test images only, so a 10,000-image test set does not
# dominate epoch time; the final evaluation uses the whole split.
EPOCH_EVAL = 2000


class TrainingDiverged(VaeError):
    """The loss went NaN/inf; the message names the step."""


def make_run_dir(out: str | Path, name: str, exist_ok: bool) -> Path:
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
                return candidate
            except FileExistsError:
                i += 1
                candidate = out / f"{name}-{i}"
        candidate.mkdir(exist_ok=True)
        return candidate
    except (NotADirectoryError, PermissionError, FileExistsError) as e:
        raise UsageError(f"cannot create run folder under '{out}' ({e.strerror or e}); pick another --out") from None


def preprocess_of(data: Dataset) -> dict:
    c, h, w = data.image_shape
    return {"channels": c, "size": [h, w], "range": [0.0, 1.0]}


def _csv_text(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _lr_lambda(total_steps: int):
    # Cosine decay to 5% of the base rate: stable late training without a tuned schedule.
    return lambda step: 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))


def fit(model, data: Dataset, recipe: Recipe, rt: Runtime, reporter: Reporter,
        on_epoch=None) -> list[dict]:
    """The main optimisation loop; returns the metrics rows (one per epoch)."""
    tc = recipe.train
    x, y = data.train_x.to(rt.device), data.train_y.to(rt.device)
    labelled = torch.zeros(len(x), dtype=torch.bool, device=rt.device)
    lab_idx = data.labelled.to(rt.device)
    labelled[lab_idx] = True
    lbs = min(tc.labelled_batch_size, len(lab_idx))

    def aug(t):
        return augment(t, tc.augment_shift, tc.augment_rotate, tc.augment_flip)
    n, bs = len(x), min(tc.batch_size, len(x))
    steps_per_epoch = math.ceil(n / bs)
    total = tc.epochs * steps_per_epoch
    warmup = tc.kl_warmup_epochs * steps_per_epoch
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(total))
    scaler = rt.grad_scaler()
    gen = torch.Generator().manual_seed(recipe.seed)
    rows, step = [], 0
    # fp16: when the GradScaler skips an overflowing step, torch warns that the scheduler stepped
    # without the optimizer. That is the scaler working as designed; keep the warning out of logs.
    warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
    reporter.start(total)
    try:
        for epoch in range(1, tc.epochs + 1):
            model.train()
            t0 = time.perf_counter()
            perm = torch.randperm(n, generator=gen).to(rt.device)
            sums: dict[str, float] = {}
            for i in range(steps_per_epoch):
                idx = perm[i * bs:(i + 1) * bs]
                lab = lab_idx[torch.randint(len(lab_idx), (lbs,), generator=gen).to(rt.device)]
                batch = Batch(aug(x[idx]), y[idx], labelled[idx], aug(x[lab]), y[lab])
                kl_weight = min(1.0, (step + 1) / warmup) if warmup else 1.0
                with rt.autocast():
                    terms = model.loss(batch, kl_weight)
                loss = terms["loss"]
                if not torch.isfinite(loss):
                    raise TrainingDiverged(f"loss became {loss.item()} at step {step + 1} (epoch {epoch}); "
                                           f"lower train.lr or set train.grad_clip")
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if tc.grad_clip > 0:
                    scaler.unscale_(opt)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
                scaler.step(opt)
                scaler.update()
                sched.step()
                step += 1
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + v.item() * len(idx)
                reporter.step(1, f"loss {loss.item():.2f}")
            test = evaluate(model, data.test_x[:EPOCH_EVAL], data.test_y[:EPOCH_EVAL], data.classes, rt)
            row = {"epoch": epoch, "step": step, **{f"train_{k}": round(v / n, 5) for k, v in sums.items()},
                   "kl_weight": round(kl_weight, 4), "lr": f"{sched.get_last_lr()[0]:.3g}",
                   "test_elbo": round(test["elbo"], 4), "test_accuracy": round(test["accuracy"], 4),
                   "seconds": round(time.perf_counter() - t0, 3)}
            rows.append(row)
            reporter.log(f"epoch {epoch}/{tc.epochs}  loss {row['train_loss']:.3f}  test elbo "
                         f"{row['test_elbo']:.3f}  acc {row['test_accuracy']:.4f}  {row['seconds']:.1f}s")
            if on_epoch is not None:
                on_epoch(rows)
    finally:
        reporter.stop()
    return rows


def train(recipe: Recipe, *, out: str | Path = "runs", name: str | None = None, exist_ok: bool = False,
          reporter: Reporter | None = None) -> dict:
    """Train per the recipe; writes the run directory and returns the results and paths."""
    reporter = reporter or Reporter()
    t_start = time.perf_counter()
    rt = resolve(recipe.train.device, recipe.train.precision)
    seed_everything(recipe.seed)
    data = build_dataset(recipe.data, recipe.seed)
    model = build_model(recipe.model, data.image_shape, len(data.classes)).to(rt.device)
    run_dir = make_run_dir(out, name or recipe.name or "run", exist_ok)
    paths = {"run_dir": run_dir, "recipe": run_dir / "recipe.yaml", "metrics": run_dir / "metrics.csv",
             "weights": run_dir / "model.safetensors", "samples": run_dir / "samples.png"}
    fsutil.write_text(paths["recipe"], yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    reporter.log(f"training '{recipe.model.name}' on {recipe.data.name}: {len(data.train_x)} train "
                 f"({len(data.labelled)} labelled), {len(data.test_x)} test, image {data.image_shape}, "
                 f"{rt.device.type}/{rt.precision} -> {run_dir}")

    rows = fit(model, data, recipe, rt, reporter,
               on_epoch=lambda rows: fsutil.write_text(paths["metrics"], _csv_text(rows)))
    lab = data.labelled.to(rt.device)
    head = model.fit_classifier(data.train_x.to(rt.device)[lab], data.train_y.to(rt.device)[lab],
                                recipe.train.head_steps, 256)
    metrics = evaluate(model, data.test_x, data.test_y, data.classes, rt)
    train_seconds = time.perf_counter() - t_start
    summary = {k: metrics[k] for k in ("accuracy", "elbo", "recon", "kl", "n")}
    summary["train_seconds"] = round(train_seconds, 2)
    checkpoint.save(paths["weights"], model, classes=data.classes, preprocess=preprocess_of(data),
                    metrics=summary, recipe=recipe.to_dict(),
                    extra={"labelled_indices": data.labelled.tolist(), "runtime": {
                        "device": rt.device.type, "precision": rt.precision}, "head": head})
    with torch.no_grad():
        torch.manual_seed(recipe.seed)
        with rt.autocast():
            samples = model.sample(recipe.train.num_samples)
    pictures.save_grid(samples, paths["samples"])
    reporter.log(f"done in {train_seconds:.1f}s: test accuracy {metrics['accuracy']:.4f}, "
                 f"test elbo {metrics['elbo']:.3f}")
    return {"run_dir": str(run_dir), "paths": {k: str(v) for k, v in paths.items()},
            "device": rt.device.type, "precision": rt.precision, "epochs": len(rows),
            "train_seconds": round(train_seconds, 2), "test": metrics}
