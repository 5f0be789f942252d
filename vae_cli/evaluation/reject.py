"""Scores for `classify --reject` and `vae eval --ood`: how much an image looks like the training data
(higher: more typical), their calibration on held-out training images, and the gate that applies one.

Why more than the likelihood: deep generative models trained on natural photos give *higher* likelihood
to simple images of another kind (SVHN digits, constant or smooth images) than to their own test images
(Nalisnick et al. 2019, "Do deep generative models know what they don't know?"), because an image with
little detail is cheap to encode whatever its content. The scores:

  likelihood   log p(x), the IWAE bound with `train.reject_samples` samples (Burda et al. 2016), in nats.
  complexity   log2 p(x) + L(x): the likelihood corrected by the image's own complexity L(x), its length in
               bits when compressed losslessly as PNG (Serra et al. 2020, "Input complexity and
               out-of-distribution detection with likelihood-based generative models", S(x) with the sign
               flipped). A likelihood ratio against a generic image compressor: simple images get a high
               log p(x) *and* a short L(x), so the correction removes what made them look typical.
  confidence   the classifier's maximum softmax probability (Hendrycks & Gimpel 2017, "A baseline for
               detecting misclassified and out-of-distribution examples").
  energy       logsumexp of the classifier's logits, the negative free energy (Liu et al. 2020,
               "Energy-based out-of-distribution detection"): the softmax throws away the logits' scale,
               which an unfamiliar image tends to shrink. On CIFAR-10 it separates colour-inverted photos
               at 0.82 AUROC where the maximum softmax gives 0.76 (BENCHMARKS.md, session 7).
  rotation     log p(upright | x) from a head trained, beside the model, to tell which of four quarter turns
               an image was given (`model.rotation` > 0; Hendrycks et al. 2019, "Using self-supervised
               learning can improve model robustness and uncertainty"). Only models with that head have it.
  colour       log p(true colours | x), its colour counterpart: a head trained to tell which of the 6 orders of
               the RGB channels an image was given (`model.colour_order` > 0; colour permutation as an input
               transformation, Lee et al. 2020, "Self-supervised label augmentation via input
               transformations"): photos whose colours do not fit their content. Colour models with the head.
  ratio        log p^{>k}(x) - log p(x), from a hierarchical VAE (`hvae`, `m2h`) only: the IWAE bound with the finest
               latent groups drawn from their prior against the full one (Havtorn et al. 2021, "Hierarchical
               VAEs know what they don't know"; 0.89 AUROC CIFAR-10 vs SVHN where the plain likelihood gives
               0.08). The finest latents carry the local texture every photo has; the ratio asks how much of
               the image the top levels alone explain.
  knn          the cosine similarity of the image's features (the classifier's trunk in M2) to its k-th nearest
               neighbour among the held-out training images' (Sun et al. 2022, "Out-of-distribution detection
               with deep nearest neighbors"): no assumption on the features' distribution, where a Gaussian
               (Mahalanobis) fit was at chance on colour-inverted CIFAR-10. The held-out features travel in the
               weights file (`reject.reference`); the held-out images' own values leave themselves out.
  combined     likelihood and complexity (two-sided: too typical-looking is as suspect as too unusual; both
               read log p(x), so they count as one p-value, Bonferroni's twice the smaller), energy
               (confidence in files calibrated before it existed), knn (files calibrated since it exists) and,
               where the model has them, rotation and colour (lower tail), joined by Fisher's method
               (Fisher 1925): each turned into its p-value among the held-out training images, then
               2 * sum(log p). An image is rejected when it is unusual for any view, weighted by how unusual.

Every score is calibrated the same way: its `train.reject_rate` quantile on the held-out training images
is the threshold; the sorted held-out values of every score travel in the weights file, so another rate
or another score needs no retraining (`classify --reject-rate`, `--reject-score`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from vae_cli.core.errors import CheckpointError, UsageError
from vae_cli.core.pool import map_batches
from vae_cli.core.registry import Registry
from vae_cli.evaluation import metrics
from vae_cli.evaluation.catalog import LEGACY_NAMES, REJECT_SCORES
from vae_cli.evaluation.evaluate import (
    energy,
    features,
    level_ratio,
    log_likelihood,
    predict,
    true_colours,
    upright,
)
from vae_cli.evaluation.pvalues import confidence_logit, fisher, png_bits

# Test images scored at the end of training to report the false-reject rate on new data.
TEST_CHECK_IMAGES = 2000


# Every per-image measurement a score may read (`measure` takes any subset)
PARTS = ("log_px", "png_bits", "confidence", "energy", "knn", "upright", "colours", "levels")


@dataclass(frozen=True)
class Score:
    help: str
    parts: tuple[str, ...]  # the per-image measurements it needs, some of PARTS
    # a base score: per-image values from the measurements; a derived one: from the base scores' values
    # and their sorted held-out values
    compute: Callable[[dict[str, Tensor]], Tensor] | None = None
    combine: Callable[[dict[str, Tensor], dict[str, list[float]], bool], Tensor] | None = None
    bases: tuple[str, ...] = ()  # a derived score: the base scores it combines (newer names, optional ones)


SCORES: Registry[Score] = Registry("reject score", "train.reject_score")
# base scores only some files have, with why one lacks it: a combination joins them where their held-out
# values are stored
OPTIONAL = {"rotation": "this model has no rotation head for --reject-score rotation (train it with "
                        "model.rotation > 0, e.g. 5000 on photos)",
            "colour": "this model has no colour-order head for --reject-score colour (train a colour model with "
                      "model.colour_order > 0, e.g. 2000 on photos)",
            "ratio": "this model has no latent hierarchy for --reject-score ratio (train model.name=hvae or m2h "
                     "with model.latent_levels >= 2)",
            "knn": "this weights file has no knn calibration (it was calibrated before the knn score existed, or "
                   "with fewer than 2 held-out images); `vae calibrate FILE` measures every score of this version "
                   "without retraining"}
KNN_K = 20  # neighbours (fewer with under 2,000 held-out images: k = n / 100, at least 1)
# base scores that weights files calibrated by older versions lack, with what a combination uses instead there
NEWER = {"energy": "confidence"}


def _add(name: str, parts: tuple[str, ...], **how) -> None:
    SCORES.add(name, Score(REJECT_SCORES[name], parts, **how))  # what it measures: evaluation/catalog.py


_add("likelihood", ("log_px",), compute=lambda p: p["log_px"])
_add("complexity", ("log_px", "png_bits"), compute=lambda p: p["log_px"] / math.log(2.0) + p["png_bits"])
_add("confidence", ("confidence",), compute=lambda p: p["confidence"])
_add("energy", ("energy",), compute=lambda p: p["energy"])
_add("rotation", ("upright",), compute=lambda p: p["upright"])
_add("colour", ("colours",), compute=lambda p: p["colours"])
_add("ratio", ("levels",), compute=lambda p: p["levels"])
_add("knn", ("knn",), compute=lambda p: p["knn"])
_add("combined", PARTS,
     combine=fisher(((("likelihood", "two"), ("complexity", "two")), ("energy", "lower"), ("knn", "lower"),
                     ("rotation", "lower"), ("colour", "lower")), optional=OPTIONAL, older=NEWER),
     bases=("likelihood", "complexity", "energy", "knn", "rotation", "colour"))
# the scores whose held-out values are stored
BASE = ("likelihood", "complexity", "confidence", "energy", "knn", "rotation", "colour", "ratio")


@dataclass(frozen=True)
class Reference:
    """The held-out images' unit-length features, for the knn score, and its k."""

    features: Tensor
    k: int


def knn_similarity(f: Tensor, ref: Reference, leave_self_out: bool = False) -> Tensor:
    """Cosine similarity of each row of `f` to its k-th most similar row of the reference (Sun et al. 2022);
    `leave_self_out`: f is the reference itself, so each row's own match is skipped."""
    f = torch.nn.functional.normalize(f.float(), dim=1)
    k = ref.k + (1 if leave_self_out else 0)
    sims = map_batches(lambda fb: (fb @ ref.features.T).topk(k, dim=1).values[:, -1], f.split(1024), f.device)
    return torch.cat(sims).double() if sims else torch.empty(0, dtype=torch.float64)


# The top bound's draws when the whole bound is the likelihood's: another seed, so they are independent of that
# pass's, as they are when `ratio` alone measures both bounds one after the other (its held-out values and a
# classified image's then have one distribution)
TOP_DRAWS = 1


def measure(model, x: Tensor, rt, samples: int, seed: int, parts: set[str] | frozenset[str] = frozenset(PARTS),
            progress=None, reference: Reference | None = None) -> dict[str, Tensor]:
    """The per-image measurements the scores read (float64, on the CPU); `upright` and `colours` only from a
    model with a rotation or colour-order head, `knn` only against a `reference`."""
    out = {}
    if "knn" in parts and reference is not None:
        out["knn"] = knn_similarity(features(model, x, rt), reference)
    if "upright" in parts and (up := upright(model, x, rt)) is not None:
        out["upright"] = up.double()
    if "colours" in parts and (c := true_colours(model, x, rt)) is not None:
        out["colours"] = c.double()
    if "png_bits" in parts:
        out["png_bits"] = png_bits(x)
    if "confidence" in parts:
        out["confidence"] = confidence_logit(predict(model, x, rt))
    if "energy" in parts:
        out["energy"] = energy(model, x, rt).double()
    if "log_px" in parts:
        out["log_px"] = log_likelihood(model, x, samples, None, rt, seed=seed, progress=progress).double()
    if "levels" in parts:  # with the likelihood's bound when it was measured: one ladder pass, not two
        full = out.get("log_px")
        r = level_ratio(model, x, samples, rt, seed=seed + (TOP_DRAWS if full is not None else 0), full=full)
        if r is not None:
            out["levels"] = r
    return out


def needs(name: str, held: dict[str, list[float]] | None = None) -> set[str]:
    """The measurements a score reads. With a file's calibration (`held`), a derived score reads only those of
    the bases that file combines: energy or, in older files, confidence; rotation where the model has it. Each
    classifier score costs a trunk pass (two with test-time flips), so `classify --reject` skips the unused."""
    s = SCORES.get(name)
    if held is None or not s.bases:
        return set(s.parts)
    used = {NEWER[n] if n in NEWER and n not in held else n for n in s.bases}
    return {part for n in used if n not in OPTIONAL or n in held for part in SCORES.get(n).parts}


def base_values(parts: dict[str, Tensor]) -> dict[str, Tensor]:
    """Every base score the measurements allow."""
    # NaN (a broken image or model) counts as least typical, so it is rejected and the file stays valid JSON
    return {n: torch.nan_to_num(SCORES.get(n).compute(parts), nan=-1e30, posinf=1e30, neginf=-1e30)
            for n in BASE if set(SCORES.get(n).parts) <= set(parts)}


def values(name: str, base: dict[str, Tensor], held: dict[str, list[float]], in_sample: bool = False) -> Tensor:
    """Per-image values of a score (higher: more like the training data); `in_sample`: the images are the
    held-out ones themselves."""
    s = SCORES.get(name)
    return base[name] if s.combine is None else s.combine(base, held, in_sample)


def held_sorted(cal: dict) -> dict[str, list[float]]:
    """The sorted held-out values of each base score in a calibration (older files: the likelihood's)."""
    comps = cal.get("components")
    if comps is None:
        return {"likelihood": list(cal["holdout_scores"])}
    return {n: sorted(v) for n, v in comps.items()}


def held_out_values(cal: dict, name: str) -> Tensor:
    """A score's values on the held-out images; a derived score is computed from the per-image components."""
    SCORES.get(name)
    held = held_sorted(cal)
    if name in held:
        return torch.tensor(held[name], dtype=torch.float64)
    comps = cal.get("components") or {}
    if name in OPTIONAL:
        raise CheckpointError(f"{OPTIONAL[name]}; it has: {', '.join(sorted(held))}")
    if name in NEWER and comps:
        raise CheckpointError(f"this weights file was calibrated before the {name} score existed (it has: "
                              f"{', '.join(sorted(held))}); `vae calibrate FILE` measures every score of this version "
                              "without retraining")
    if not set(BASE) - set(OPTIONAL) - set(NEWER) <= set(comps):
        raise CheckpointError(f"this weights file has no held-out values for --reject-score {name} (it has: "
                              f"{', '.join(sorted(held))}); `vae calibrate FILE` measures every score of this version "
                              "without retraining")
    base = {n: torch.tensor(v, dtype=torch.float64) for n, v in comps.items()}
    return values(name, base, held, in_sample=True)


def threshold_of(cal: dict, name: str, rate: float) -> float:
    return metrics.rejection_threshold(held_out_values(cal, name), rate)


def knn_k(holdout_images: int) -> int | None:
    """The knn score's k for a held-out split of this size; None when it is too small to leave an image out
    and still find k neighbours."""
    k = max(1, min(KNN_K, holdout_images // 100))
    return k if holdout_images > k else None


def unavailable(score: str, model, holdout_images: int) -> str | None:
    """Why a model trained with this many held-out images could not be calibrated for `score` (one line with
    the fix), or None. Checked before training, so a run does not fail after its last epoch."""
    if score == "rotation" and not model.has_rotation_head:
        return (f"train.reject_score=rotation needs a rotation head, which '{model.cfg.name}' with "
                f"model.rotation={model.cfg.rotation:g} has not: set model.rotation > 0 (M2 on images, e.g. 5000) "
                "or pick another train.reject_score")
    if score == "colour" and not model.has_colour_head:
        return (f"train.reject_score=colour needs a colour-order head, which '{model.cfg.name}' with "
                f"model.colour_order={model.cfg.colour_order:g} has not: set model.colour_order > 0 (M2 on colour "
                "images, e.g. 2000) or pick another train.reject_score")
    if score == "ratio" and not model.has_hierarchy:
        return (f"train.reject_score=ratio compares a hierarchy's levels, which '{model.cfg.name}' has not: train "
                "model.name=hvae or m2h (model.latent_levels >= 2) or pick another train.reject_score")
    if score == "knn" and holdout_images and knn_k(holdout_images) is None:
        return (f"train.reject_score=knn compares an image with its nearest held-out neighbours, and this split "
                f"holds out {holdout_images} image(s): raise data.holdout_fraction (at least 2 held-out images) "
                "or pick another train.reject_score")
    return None


def calibrate(model, holdout_x: Tensor | None, test_x: Tensor, rt, *, rate: float, samples: int, seed: int,
              default: str) -> tuple[dict, Tensor | None] | None:
    """The `--reject` calibration stored in a weights file: every base score on each held-out image (in
    the same order, so derived scores can be rebuilt), the default score's threshold at `rate` and its
    sorted held-out values, and the share of (the first 2,000) test images each score would reject; beside
    it, the held-out images' unit-length features for the knn score (a tensor for the weights file, not
    metadata; None when the split is too small for it)."""
    if holdout_x is None or len(holdout_x) == 0:
        return None
    feats = features(model, holdout_x, rt)
    k = knn_k(len(holdout_x))
    ref = Reference(torch.nn.functional.normalize(feats, dim=1), k) if k is not None else None
    parts = measure(model, holdout_x, rt, samples, seed, set(PARTS) - {"knn"})  # knn: leaving each image out
    if ref is not None:
        parts["knn"] = knn_similarity(feats, ref, leave_self_out=True)
    held = base_values(parts)
    cal = {"score": default, "samples": samples, "rate": rate, "holdout_images": len(holdout_x),
           "components": {n: [float(f"{v:.7g}") for v in t.tolist()] for n, t in held.items()}}
    if ref is not None:
        cal["knn_k"] = ref.k
    # a seeded random subset: folder datasets list the test images class by class, so the first 2,000
    # would be one or two classes (measured: 3.0% false rejects on those against 1.1% on a random 3,000)
    pick = torch.randperm(len(test_x), generator=torch.Generator().manual_seed(seed))[:TEST_CHECK_IMAGES]
    test = base_values(measure(model, test_x[pick], rt, samples, seed + 1, reference=ref))
    sorted_held = held_sorted(cal)
    cal["test_reject_rates"] = {
        n: float((values(n, test, sorted_held) < threshold_of(cal, n, rate)).double().mean()) if len(test_x) else None
        for n in SCORES.names() if n not in OPTIONAL or n in held}
    cal["threshold"] = threshold_of(cal, default, rate)
    cal["holdout_scores"] = sorted(held_out_values(cal, default).tolist())
    cal["test_reject_rate"] = cal["test_reject_rates"][default]
    return cal, (ref.features.float().contiguous() if ref is not None else None)


@dataclass(frozen=True)
class Gate:
    """One score and its threshold, ready to judge new images."""

    name: str
    threshold: float
    rate: float
    samples: int
    held: dict[str, list[float]]
    reference: Reference | None = None

    def scores(self, model, x: Tensor, rt, seed: int) -> Tensor:
        parts = measure(model, x, rt, self.samples, seed, needs(self.name, self.held), reference=self.reference)
        return values(self.name, base_values(parts), self.held)


def gate(meta: dict, rate: float | None = None, score: str | None = None) -> Gate:
    """The --reject gate of a weights file: its calibrated score, or another (`score`) at another `rate`,
    both from the stored held-out values (no retraining)."""
    cal = meta.get("reject")
    if not cal:
        raise CheckpointError("this weights file has no --reject calibration (it was trained with "
                              "data.holdout_fraction=0 or by an older version); retrain with "
                              "data.holdout_fraction > 0, e.g. 0.05")
    if score is not None and score not in SCORES.names():
        raise UsageError(SCORES.unknown(score, "--reject-score"))
    stored = LEGACY_NAMES.get(cal.get("score"), cal.get("score"))
    name = score or stored
    rate = cal["rate"] if rate is None else rate
    if cal.get("components") is None and name == stored and rate == cal["rate"]:
        threshold = cal["threshold"]  # an older file: its stored threshold
    else:  # rebuilt from the held-out values, so it always matches this version's definition of the score
        threshold = threshold_of(cal, name, rate)
    ref = meta.get("reject_reference")
    reference = Reference(ref, int(cal["knn_k"])) if ref is not None and "knn_k" in cal else None
    if reference is None and "knn" in (cal.get("components") or {}):
        raise CheckpointError("this weights file's --reject calibration lacks the held-out features its knn score "
                              "compares with (tensor 'reject.reference'); the file is damaged: restore it, or "
                              "`vae calibrate FILE` to measure it again")
    return Gate(name, threshold, rate, cal["samples"], held_sorted(cal), reference)
