"""Every number `vae eval` reports, defined once: its key in `--json`, the label and format people see on
stdout and in report.html, and the order of both. docs/METRICS.md documents the same keys, and a test
holds the three (this list, the JSON output, the page) to each other, so a new metric is one entry here
(plus its computation in evaluate.py and its row in the page, which the test demands).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Metric:
    key: str  # its key in `vae eval --json`, inside `section`
    section: str = ""  # "" (top level), or the object it sits in: "nll", "probe"
    label: str = ""  # how people see it, a template over the section's keys; "" = not a summary row
    show: Callable[[dict], str] | None = None  # the shown value, from the section


def _num(key: str, spec: str) -> Callable[[dict], str]:
    return lambda s: format(s[key], spec)


def _opt(key: str) -> Callable[[dict], str]:
    """A share that may be null (the model cannot give it)."""
    return lambda s: "n/a" if s[key] is None else format(s[key], ".4f")


METRICS: list[Metric] = [
    Metric("weights"),
    Metric("split"),
    Metric("precision"),
    Metric("n", label="images", show=lambda s: str(s["n"])),
    Metric("accuracy", label="accuracy", show=_num("accuracy", ".4f")),
    Metric("macro_f1", label="macro F1", show=_num("macro_f1", ".4f")),
    Metric("ece", label="expected calibration error", show=_num("ece", ".4f")),
    Metric("recon_accuracy", label="accuracy on reconstructions", show=_opt("recon_accuracy")),
    Metric("sample_accuracy", label="accuracy of class-conditional samples", show=_opt("sample_accuracy")),
    Metric("elbo", label="ELBO (nats/image)", show=_num("elbo", ".3f")),
    Metric("recon", label="reconstruction -log p(x|z)", show=_num("recon", ".3f")),
    Metric("kl", label="KL(q(z|x) || p(z))", show=_num("kl", ".3f")),
    Metric("latent_dim"),
    Metric("active_units", label="active units", show=lambda s: f"{s['active_units']} of {s['latent_dim']}"),
    Metric("per_class"),
    Metric("confusion_matrix"),
    Metric("nll"),
    Metric("nats", "nll", "NLL, IWAE k={iw_samples} (nats)",
           lambda s: f"{s['nats']:.3f} ± {s['stderr_nats']:.3f}" + ("" if s["discrete"] else " (a density)")),
    Metric("stderr_nats", "nll"),
    Metric("bits_per_dim", "nll", "bits/dim", _num("bits_per_dim", ".4f")),
    Metric("iw_samples", "nll"),
    Metric("levels", "nll"),
    Metric("discrete", "nll"),
    Metric("probe"),
    Metric("labels_per_class", "probe"),
    Metric("linear_accuracy", "probe", "linear probe ({labels_per_class} labels/class)",
           _num("linear_accuracy", ".4f")),
    Metric("knn_accuracy", "probe", "{knn_k}-NN ({labels_per_class} labels/class)", _num("knn_accuracy", ".4f")),
    Metric("knn_k", "probe"),
    Metric("ood"),
    *(Metric(k, "ood") for k in ("score", "rate", "samples", "in_images", "false_reject_rate", "sets")),
]


def keys(section: str = "") -> list[str]:
    """The keys of one section of `vae eval --json`, in order."""
    return [m.key for m in METRICS if m.section == section]


def summary_rows(res: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, value) rows of an evaluation for people: stdout's table and report.html's."""
    rows = []
    for m in METRICS:
        sec = res if not m.section else res.get(m.section)
        if m.label and sec and m.key in sec:
            rows.append((m.label.format(**sec), m.show(sec)))
    return rows


# Weights files written before the --reject scores were named stored the likelihood under this name.
LEGACY_NAMES = {"iwae_log_likelihood": "likelihood"}

# The --reject scores: name and what it measures, in the order help texts list them. evaluation/reject.py
# registers each one's computation under these names (and cannot register a name missing here); the command
# line's help texts are built from this table, so they need no torch and cannot go stale.
REJECT_SCORES = {
    "likelihood": "log p(x), IWAE bound, nats (Burda et al. 2016)",
    "complexity": "log2 p(x) + PNG length in bits (Serra et al. 2020)",
    "confidence": "classifier confidence, logit of the max softmax (Hendrycks & Gimpel 2017)",
    "energy": "logsumexp of the class logits, negative free energy (Liu et al. 2020)",
    "knn": "cosine similarity to the k-th nearest held-out image in feature space (Sun et al. 2022)",
    "rotation": "log p(upright|x), self-supervised rotation head (Hendrycks et al. 2019); models trained with "
                "model.rotation > 0",
    "colour": "log p(true colours|x), self-supervised colour-order head (Lee et al. 2020); colour models trained "
              "with model.colour_order > 0",
    "ratio": "log p(x) from the top latent levels minus the whole model's, IWAE bounds (Havtorn et al. 2021); "
             "hierarchical models (hvae)",
    "combined": "likelihood and complexity (two-sided, one Bonferroni p-value) + energy + knn + rotation and "
                "colour where the model has them, Fisher's method on held-out p-values",
}


def describe_reject(rej: dict) -> str:
    """The --reject calibration stored in a weights file, in one line (for `vae info` and report.html)."""
    test = "" if rej.get("test_reject_rate") is None else f"; {rej['test_reject_rate']:.1%} of test images"
    name = LEGACY_NAMES.get(rej.get("score"), rej.get("score", "likelihood"))
    return (f"{name} score < {rej['threshold']:.6g} ({rej['rate']:.1%} of {rej['holdout_images']} held-out "
            f"images{test})")
