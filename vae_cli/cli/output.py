"""How results look on stdout: tables for people, CSV and JSON for pipelines. No torch here."""

from __future__ import annotations

import csv
import json
import sys
from typing import Any

from vae_cli.evaluation.catalog import summary_rows


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def table(title: str | None, rows: list[tuple[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title, show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column()
    for k, v in rows:
        t.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    class _Console(Console):
        def on_broken_pipe(self) -> None:  # rich's own handler exits 1; ours is the documented 141
            raise BrokenPipeError

    _Console(soft_wrap=True).print(t)


def print_train(result: dict, decision: dict | None) -> None:
    t = result["test"]
    table(None, [("run", result["run_dir"]), ("weights", result["paths"]["weights"]),
                  ("samples", result["paths"]["samples"]), ("metrics", result["paths"]["metrics"]),
                  ("device", f"{result['device']}/{result['precision']}"),
                  ("train seconds", result["train_seconds"]), ("test accuracy", t["accuracy"]),
                  ("test ELBO (nats/image)", t["elbo"])])
    if decision is not None:
        old = "none" if decision["old"] is None else f"{decision['old']:.4f}"
        verdict = "promoted" if decision["promoted"] else "kept the old model"
        unknown = decision["unknown_to_old"]
        note = f"; classes the old model does not know: {', '.join(unknown)}" if unknown else ""
        print(f"promotion: {verdict} at {decision['target']} ({decision['metric']} on the same {decision['images']} "
              f"test images: new {decision['new']:.4f}, old {old}{note})")


def print_confusion(classes: list[str], cm: list[list[int]]) -> None:
    """Rows are true classes, columns predictions; columns are numbered so long names stay readable."""
    label = max(len(f"{i} {c}") for i, c in enumerate(classes)) + 2
    cell = max(4, len(str(len(classes) - 1)) + 1, max(len(str(v)) for row in cm for v in row) + 1)
    print("\nconfusion matrix (rows: true class, columns: predicted class index)")
    print("".ljust(label) + "".join(str(i).rjust(cell) for i in range(len(classes))))
    for i, (c, row) in enumerate(zip(classes, cm)):
        print(f"{i} {c}".ljust(label) + "".join(str(v).rjust(cell) for v in row))


def print_rows(rows: list[dict], fmt: str, top_k: int) -> None:
    """One row per image; with --reject also its score (higher: more like the training data) and the verdict."""
    if fmt == "json":
        print_json(rows)
        return
    gated = bool(rows) and "rejected" in rows[0]
    if fmt == "csv":
        w = csv.writer(sys.stdout)
        header = ["path"]
        for i in range(1, top_k + 1):
            header += [f"class_{i}", f"prob_{i}"] if top_k > 1 else ["class", "prob"]
        w.writerow(header + (["reject_score", "rejected"] if gated else []))
        for r in rows:
            gate = [f"{r['score']:.3f}", str(r["rejected"]).lower()] if gated else []
            w.writerow([r["path"]] + [v for p in r["top"] for v in (p["class"], f"{p['prob']:.6f}")] + gate)
        return
    for r in rows:
        preds = "  ".join(f"{p['class']} {p['prob']:.4f}" for p in r["top"])
        gate = (f"\tREJECTED (score {r['score']:.4g}: unlike the training data)" if r["rejected"]
                else f"\tok (score {r['score']:.4g})") if gated else ""
        print(f"{r['path']}\t{preds}{gate}")


def print_eval(res: dict) -> None:
    """`vae eval` for people: the summary, per-class precision/recall/F1, the confusion matrix."""
    rows = summary_rows(res)
    table(f"{res['weights']} ({res['split']} split, {res['n']} images, {res['precision']})", rows)
    print("\nper class")
    width = max(len("class"), *(len(c) for c in res["per_class"])) + 2
    print("class".ljust(width) + "".join(h.rjust(10) for h in ("precision", "recall", "F1", "support")))
    for c, v in res["per_class"].items():
        print(c.ljust(width) + f"{v['precision']:10.4f}{v['recall']:10.4f}{v['f1']:10.4f}{v['support']:10d}")
    print_confusion(list(res["per_class"]), res["confusion_matrix"])


def print_ood(rep: dict) -> None:
    """`vae eval --ood` for people: per outlier set, each score's AUROC, AUPR and reject rates."""
    print(f"\n--reject against outlier sets ({rep['in_images']} in-distribution images; each score's threshold "
          f"rejects {rep['rate']:.1%} of held-out training images; * = the model's score)")
    names = list(rep["false_reject_rate"])
    width = max(len("score"), *(len(n) + 2 for n in names))
    for label, s in rep["sets"].items():
        print(f"\n{label} ({s['images']} images)")
        print("score".ljust(width) + "".join(h.rjust(13) for h in ("AUROC", "AUPR", "rejected", "false rej.")))
        for n, d in s["scores"].items():
            mark = "*" if n == rep["score"] else " "
            print(f"{n}{mark}".ljust(width) + f"{d['auroc']:13.4f}{d['aupr']:13.4f}{d['reject_rate']:13.1%}"
                  f"{d['false_reject_rate']:13.1%}")
