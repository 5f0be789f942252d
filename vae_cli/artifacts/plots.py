"""Plots drawn with matplotlib (Agg, no screen needed): the latent map, training curves and the confusion
matrix. Each takes plain arrays and writes one PNG atomically; matplotlib is imported only here.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from vae_cli.core.fsutil import write_with

DPI = 100


def _figure(w: float, h: float):
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt, plt.figure(figsize=(w, h), dpi=DPI)


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))
    plt.close(fig)
    return path


def _spans_a_plane(z: np.ndarray) -> bool:
    """Whether the centred codes have two directions of spread (a second singular value that is not ~0)."""
    s = np.linalg.svd(z.astype(np.float64) - z.mean(0), compute_uv=False)
    return bool(np.isfinite(s).all() and len(s) > 1 and s[1] > 1e-6 * max(s[0], 1e-30))


def project_2d(z: np.ndarray, method: str = "tsne") -> tuple[np.ndarray, str]:
    """Latent means -> 2-D: as they are when the code is 2-D; else t-SNE (van der Maaten & Hinton 2008,
    initialised from PCA, seeded), which keeps neighbourhoods and so shows clusters, or the first two
    principal components, which keep global distances but often overlap classes."""
    if z.shape[1] <= 2:
        return np.pad(z, ((0, 0), (0, 2 - z.shape[1]))), "z"
    if len(z) < 3 or not _spans_a_plane(z):  # a tiny test split, or codes all on one point or line: t-SNE
        return z[:, :2], "first two latent coordinates"  # divides by their spread (NaN, then a segfault)
    if method == "tsne" and len(z) > 5:
        from sklearn.manifold import TSNE

        tsne = TSNE(n_components=2, init="pca", random_state=0, perplexity=min(30.0, (len(z) - 1) / 3))
        return tsne.fit_transform(z), "t-SNE"
    from sklearn.decomposition import PCA

    pca = PCA(n_components=2, random_state=0).fit(z)
    share = pca.explained_variance_ratio_.sum()
    return pca.transform(z), f"PCA ({share:.0%} of variance)"


def latent_map(z: np.ndarray, y: np.ndarray, classes: list[str], path: Path, method: str = "tsne") -> Path:
    """Scatter of the 2-D projection of latent means, one colour per class."""
    xy, how = project_2d(z, method)
    plt, fig = _figure(6.4, 5.6)
    ax = fig.add_subplot(1, 1, 1)
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    for i, c in enumerate(classes):
        sel = y == i
        ax.scatter(xy[sel, 0], xy[sel, 1], s=6, alpha=0.7, color=cmap(i % cmap.N), label=c)
    ax.set_title(f"Latent means of {len(y)} test images: {how}")
    axis = {"z": "z", "t-SNE": "t-SNE"}.get(how, "PC")
    ax.set_xlabel(f"{axis} 1")
    ax.set_ylabel(f"{axis} 2")
    if len(classes) <= 20:
        ax.legend(markerscale=3, fontsize=8, loc="best", ncol=2)
    return _save(plt, fig, path)


def read_metrics_csv(path: Path) -> dict[str, list[float]]:
    """metrics.csv columns as float lists (non-numeric cells become NaN)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    cols: dict[str, list[float]] = {}
    for row in rows:
        for k, v in row.items():
            try:
                cols.setdefault(k, []).append(float(v))
            except (TypeError, ValueError):
                cols.setdefault(k, []).append(float("nan"))
    return cols


def training_curves(cols: dict[str, list[float]], path: Path, accuracy: bool = True) -> Path:
    """Loss terms and test numbers per epoch, one panel each (`accuracy=False` for models whose classifier
    is fitted after the loop, where per-epoch accuracy means nothing)."""
    panels = [("train_loss", "training loss (nats/image)"), ("train_recon", "reconstruction -log p(x|z)"),
              ("train_kl", "KL(q(z|x) || p(z))"), ("test_elbo", "test ELBO"), ("test_accuracy", "test accuracy")]
    panels = [(k, t) for k, t in panels if k in cols and (accuracy or k != "test_accuracy")]
    epochs = cols.get("epoch") or list(range(1, len(next(iter(cols.values()), [])) + 1))
    plt, fig = _figure(4.0 * min(3, len(panels)), 3.2 * ((len(panels) + 2) // 3))
    for i, (k, title) in enumerate(panels):
        ax = fig.add_subplot((len(panels) + 2) // 3, min(3, len(panels)), i + 1)
        # columns filled every train.eval_every epochs: the blank cells (NaN) dropped, so the line joins the rest
        pts = [(e, v) for e, v in zip(epochs, cols[k]) if v == v]
        ax.plot([e for e, _ in pts], [v for _, v in pts], marker="o", markersize=3)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    return _save(plt, fig, path)


def confusion(cm: list[list[int]], classes: list[str], path: Path) -> Path:
    """The confusion matrix as a heat map with counts; rows are true classes."""
    m = np.asarray(cm)
    k = len(classes)
    size = max(4.0, 0.5 * k + 2)
    plt, fig = _figure(size, size)
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(k), classes, rotation=90 if k > 10 else 0)
    ax.set_yticks(range(k), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if k <= 30:
        top = m.max() if m.size else 0
        for i in range(k):
            for j in range(k):
                ax.text(j, i, str(m[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if m[i, j] > top / 2 else "black")
    ax.set_title(f"Confusion matrix ({m.sum()} test images, accuracy {np.trace(m) / max(1, m.sum()):.2%})")
    return _save(plt, fig, path)
