"""Evaluation numbers as pure functions over tensors/arrays: importance-weighted log-likelihood, active
units, classification quality (precision/recall/F1, calibration) and probes on latent codes.

Each cites where its definition comes from, so the numbers compare with papers.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from torch import Tensor


@torch.no_grad()
def iwae_log_likelihood(model, x: Tensor, k: int, levels: int | None, autocast, max_rows: int = 8192) -> Tensor:
    """Per-image IWAE estimate of log p(x) with k importance samples (Burda et al. 2016, eq. 8), in nats.

    The k samples are drawn in chunks so that at most `max_rows` decoder rows are alive at once, and the
    chunks are combined exactly by a running logsumexp (k = 5000 needs no more memory than k = 50).
    """
    b = x.shape[0]
    chunk = max(1, min(k, max_rows // max(1, b)))
    total = torch.full((b,), -math.inf, device=x.device)
    done = 0
    while done < k:
        n = min(chunk, k - done)
        with autocast():
            log_w = model.log_weights(x, n, levels).float()
        total = torch.logaddexp(total, torch.logsumexp(log_w, 1))
        done += n
    return total - math.log(k)


def bits_per_dim(nll_nats: float, dims: int) -> float:
    """Nats per image -> bits per dimension (the unit of image-density papers, e.g. van den Oord et al. 2016)."""
    return nll_nats / (dims * math.log(2.0))


def active_units(means: Tensor, threshold: float = 0.01) -> int:
    """Latent dimensions u with Cov_x(E_q(u|x)[u]) > threshold (Burda et al. 2016, section 5.2): units
    whose posterior mean moves with the input; the rest have collapsed to the prior."""
    if means.shape[0] < 2:
        return 0
    return int((means.float().var(0, unbiased=True) > threshold).sum().item())


def expected_calibration_error(probs: np.ndarray, y: np.ndarray, bins: int = 15) -> float:
    """ECE: sum over equal-width confidence bins of |accuracy - confidence| weighted by the bin's share
    (Guo, Pleiss, Sun & Weinberger 2017, "On Calibration of Modern Neural Networks", eq. 3)."""
    if len(y) == 0:
        return 0.0
    conf, pred = probs.max(1), probs.argmax(1)
    correct = (pred == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            ece += sel.mean() * abs(correct[sel].mean() - conf[sel].mean())
    return float(ece)


def classification(probs: np.ndarray, y: np.ndarray, classes: list[str]) -> dict:
    """Accuracy, per-class precision/recall/F1/support, macro F1, confusion matrix (rows: true), ECE."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    k = len(classes)
    pred = probs.argmax(1) if len(probs) else np.zeros(0, np.int64)
    labels = list(range(k))
    p, r, f, s = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    with warnings.catch_warnings():  # one class: sklearn warns that it found a single label, which we know
        warnings.filterwarnings("ignore", message="A single label was found", category=UserWarning)
        confusion = confusion_matrix(y, pred, labels=labels).tolist()
    return {
        "accuracy": float((pred == y).mean()) if len(y) else 0.0,
        "per_class": {c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
                      for i, c in enumerate(classes)},
        "macro_f1": float(f.mean()),
        "ece": expected_calibration_error(probs, y),
        "confusion_matrix": confusion,
    }


def latent_probe(train_z: np.ndarray, train_y: np.ndarray, test_z: np.ndarray, test_y: np.ndarray,
                 neighbours: int = 5) -> dict:
    """How linearly separable / locally clustered the classes are in latent space: a logistic-regression
    probe on standardised codes and a k-nearest-neighbour vote, both fitted on the given labelled codes
    and scored on the test codes (the evaluation of representation papers, e.g. Chen et al. 2020)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    k = max(1, min(neighbours, len(train_y)))
    linear = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(train_z, train_y)
    knn = KNeighborsClassifier(n_neighbors=k).fit(train_z, train_y)
    return {"linear_accuracy": float(linear.score(test_z, test_y)),
            "knn_accuracy": float(knn.score(test_z, test_y)), "knn_k": k}


def rejection_threshold(scores: Tensor, rate: float) -> float:
    """The log-likelihood score below which `rate` of the given (held-out, in-distribution) images fall."""
    return float(torch.quantile(scores.float(), rate).item())


def detection(in_scores: Tensor, out_scores: Tensor, threshold: float) -> dict:
    """How well a score (higher: more typical) tells outliers from in-distribution images, outliers being
    the positive class: AUROC (probability that a random outlier scores below a random in-distribution
    image, ties counting half), AUPR (average precision, sklearn's step-wise definition; its chance level
    is the outliers' share), and the share of each side below `threshold` (false and true rejects)."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    a, b = in_scores.double().numpy(), out_scores.double().numpy()
    y = np.r_[np.zeros(len(a)), np.ones(len(b))]
    s = -np.r_[a, b]
    both = len(a) > 0 and len(b) > 0
    return {"auroc": float(roc_auc_score(y, s)) if both else None,
            "aupr": float(average_precision_score(y, s)) if both else None,
            "false_reject_rate": float((a < threshold).mean()) if len(a) else None,
            "reject_rate": float((b < threshold).mean()) if len(b) else None,
            "in_images": len(a), "out_images": len(b)}
