"""The run's pictures and its HTML report, written at the end of training and again by `vae plot`.

report.html is one self-contained file (pictures inlined as data: URIs), so it opens from disk, from a
copied run folder or an e-mail attachment, with no server. Its script only counts the pictures that
decoded (`data-images-loaded` on <body>), which the headless-browser test reads.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

import torch
import yaml

from vae_cli.artifacts import pictures, plots
from vae_cli.artifacts.rundir import PICTURES, RunDir
from vae_cli.core import fsutil
from vae_cli.core.recipe import Recipe
from vae_cli.core.runtime import Runtime, seeded
from vae_cli.data import Dataset, class_mixed
from vae_cli.evaluation.catalog import describe_reject, summary_rows
from vae_cli.evaluation.evaluate import latent_means

MAP_IMAGES = {"tsne": 2000, "pca": 5000}  # test images in the latent map (t-SNE grows ~n log n, slowly)
PER_CLASS = 10  # samples per class in samples-by-class.png
RECON_IMAGES = 36  # 6 rows of 6 pairs: a full grid
INTERP_PAIRS, INTERP_STEPS = 8, 10

# file name -> caption, in report order
CAPTIONS = {PICTURES[k]: caption for k, caption in {
    "samples": "Samples from the prior",
    "samples_by_class": "Samples by class (one row per class)",
    "reconstructions": "Test images (left of each pair) and their reconstructions",
    "interpolation": "Interpolations between test images of neighbouring classes, through latent space",
    "latent_map": "Latent means of test images, coloured by true class",
    "curves": "Training curves (metrics.csv)",
    "confusion": "Confusion matrix on the test split",
}.items()}


def write_run_pictures(model, data: Dataset, recipe: Recipe, rt: Runtime, out_dir: Path, metrics: dict,
                       metrics_csv: Path | None = None, latent_map: str | None = None,
                       run: dict | None = None) -> dict[str, str]:
    """Write every picture and report.html into out_dir; returns {name: path} of what was written.
    `latent_map` (tsne | pca) overrides the recipe's train.latent_map; `run` (label -> value) adds facts
    about the run (time, device, the --reject threshold) to the report."""
    with seeded(recipe.seed, rt.device), torch.no_grad():  # the same pictures from the same weights
        return _write_run_pictures(model, data, recipe, rt, RunDir(Path(out_dir)), metrics, metrics_csv,
                                   latent_map, run)


def _write_run_pictures(model, data: Dataset, recipe: Recipe, rt: Runtime, out: RunDir, metrics: dict,
                        metrics_csv: Path | None, latent_map: str | None, run: dict | None) -> dict[str, str]:
    out.root.mkdir(parents=True, exist_ok=True)
    model.eval()
    written: dict[str, Path] = {}
    x, y = data.test_x, data.test_y
    with rt.autocast():
        written["samples"] = pictures.save_grid(model.sample(recipe.train.num_samples).float().cpu(),
                                                out.picture("samples"))
        written["samples_by_class"] = pictures.save_grid(pictures.class_samples(model, PER_CLASS),
                                                         out.picture("samples_by_class"), nrow=PER_CLASS)
        xr = x[torch.from_numpy(class_mixed(y.numpy(), RECON_IMAGES))].to(rt.device)  # every class, not the first
        pairs = torch.stack([xr.float().cpu(), model.reconstruct(xr).float().cpu()], 1).flatten(0, 1)
        written["reconstructions"] = pictures.save_grid(pairs, out.picture("reconstructions"),
                                                        nrow=2 * max(1, int(len(xr) ** 0.5)))
        a, b = pictures.pair_indices(y, INTERP_PAIRS)
        rows = pictures.interpolation(model, x[a].to(rt.device), x[b].to(rt.device), INTERP_STEPS)
        written["interpolation"] = pictures.save_grid(rows, out.picture("interpolation"), nrow=INTERP_STEPS + 2)
    method = latent_map or recipe.train.latent_map
    n = MAP_IMAGES[method]
    pick = torch.from_numpy(class_mixed(y.numpy(), n))
    z = latent_means(model, x[pick], rt).numpy()
    written["latent_map"] = plots.latent_map(z, y[pick].numpy(), data.classes, out.picture("latent_map"), method)
    if metrics_csv is not None and Path(metrics_csv).is_file():
        written["curves"] = plots.training_curves(plots.read_metrics_csv(Path(metrics_csv)), out.picture("curves"),
                                                   accuracy=model.needs_labelled_batch)
    written["confusion"] = plots.confusion(metrics["confusion_matrix"], data.classes, out.picture("confusion"))
    written["report"] = write_report(out.report, recipe, metrics, list(written.values()), run)
    return {k: str(v) for k, v in written.items()}


def _table(rows: list[tuple[str, ...]], head: tuple[str, ...] | None = None) -> str:
    th = "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>" if head else ""
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table>{th}{body}</table>"


def run_facts(meta: dict) -> dict[str, str]:
    """Report rows from a weights file's metadata (or the same values at the end of training)."""
    facts = {"weights file": meta.get("path", ""), "created": meta.get("created", ""),
             "trained on": "{device}/{precision}, {processes} process(es)".format(**meta["runtime"])
             if meta.get("runtime") else "", "training seconds": str(meta.get("metrics", {}).get("train_seconds", ""))}
    rej = meta.get("reject")
    if rej:
        facts["--reject threshold"] = describe_reject(rej)
    return {k: v for k, v in facts.items() if v}


def write_report(path: Path, recipe: Recipe, metrics: dict, images: list[Path], run: dict | None = None) -> Path:
    """A self-contained HTML page: run facts, recipe, metrics, per-class table and every picture."""
    figures = []
    for p in images:
        data = base64.b64encode(Path(p).read_bytes()).decode("ascii")
        cap = html.escape(CAPTIONS.get(Path(p).name, Path(p).name))
        figures.append(f'<figure><img src="data:image/png;base64,{data}" alt="{cap}">'
                       f"<figcaption>{cap} <code>{html.escape(Path(p).name)}</code></figcaption></figure>")
    per_class = [(c, f"{v['precision']:.3f}", f"{v['recall']:.3f}", f"{v['f1']:.3f}", v["support"])
                 for c, v in metrics["per_class"].items()]
    title = html.escape(f"vae run: {recipe.name or 'run'} ({recipe.model.name} on {recipe.data.name})")
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }} td, th {{ border: 1px solid #ccc; padding: 3px 10px; }}
th {{ background: #f3f3f3; }} figure {{ display: inline-block; margin: 1em; vertical-align: top; }}
img {{ max-width: 1000px; image-rendering: pixelated; border: 1px solid #ddd; }}
pre {{ background: #f7f7f7; padding: 1em; overflow: auto; }}
</style></head>
<body data-images-loaded="0">
<h1>{title}</h1>
{_table(list((run or {}).items()))}
<h2>Test metrics</h2>
{_table(summary_rows(metrics))}
<h2>Per class</h2>
{_table(per_class, ("class", "precision", "recall", "F1", "support"))}
<h2>Pictures</h2>
{"".join(figures)}
<h2>Recipe</h2>
<pre>{html.escape(yaml.safe_dump(recipe.to_dict(), sort_keys=False))}</pre>
<script>
window.addEventListener("load", function () {{
  var ok = Array.prototype.filter.call(document.images, function (i) {{ return i.complete && i.naturalWidth > 0; }});
  document.body.setAttribute("data-images-loaded", String(ok.length));
}});
</script>
</body></html>
"""
    fsutil.write_text(path, page)
    return path
