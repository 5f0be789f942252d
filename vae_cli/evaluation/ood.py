"""`vae eval --ood`: how well each `--reject` score separates the test split from the user's own outlier
images (AUROC, AUPR, the false-reject rate at the calibrated threshold), so rejection can be checked on
the images that matter before it is trusted."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from torch import Tensor

from vae_cli.core.errors import CheckpointError
from vae_cli.evaluation import metrics, reject
from vae_cli.evaluation.classify import decode_files


def available_scores(cal: dict) -> list[str]:
    """The scores whose held-out values this calibration holds (every one, for files of this version)."""
    out = []
    for name in reject.SCORES.names():
        try:
            reject.held_out_values(cal, name)
        except CheckpointError:  # a file from before the score existed: report the others
            continue
        out.append(name)
    return out


def ood_report(model, meta: dict, in_x: Tensor, sets: dict[str, list[Path]], rt, *, seed: int = 0,
               rate: float | None = None, progress: Callable[[int], None] | None = None) -> tuple[dict, list[str]]:
    """({"score", "rate", "in_images", "sets": {label: {"images", "scores": {name: detection}}}}, failures).
    The in-distribution images are `in_x` (a split of the recipe's dataset); each outlier set is decoded
    as `classify` decodes files (bad files are reported, not fatal)."""
    cal = meta.get("reject")
    g = reject.gate(meta, rate)  # raises the one-line error of a file without calibration
    names = available_scores(cal)
    held = reject.held_sorted(cal)
    thresholds = {n: reject.threshold_of(cal, n, g.rate) for n in names}

    def scored(x: Tensor, s: int) -> dict[str, Tensor]:
        base = reject.base_values(reject.measure(model, x, rt, g.samples, s, progress=progress, reference=g.reference))
        return {n: reject.values(n, base, held) for n in names}

    inside = scored(in_x, seed)
    report = {"score": g.name, "rate": g.rate, "samples": g.samples, "in_images": len(in_x), "sets": {}}
    failures: list[str] = []
    for i, (label, files) in enumerate(sets.items()):
        x, bad = decode_files(files, meta)
        failures += bad
        if x is None:
            report["sets"][label] = {"images": 0, "scores": {}}
            continue
        outside = scored(x, seed + 1 + i)
        report["sets"][label] = {"images": len(x), "scores": {
            n: metrics.detection(inside[n], outside[n], thresholds[n]) for n in names}}
    report["false_reject_rate"] = {n: float((inside[n] < thresholds[n]).double().mean()) if len(in_x) else None
                                   for n in names}
    return report, failures


def mean_auroc(report: dict, name: str) -> float | None:
    """The mean AUROC of one score over the outlier sets (for a one-line summary)."""
    vals = [s["scores"][name]["auroc"] for s in report["sets"].values()
            if name in s["scores"] and s["scores"][name]["auroc"] is not None]
    return float(np.mean(vals)) if vals else None

