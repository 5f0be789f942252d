"""How results look on stdout: tables for people, CSV and JSON for pipelines. No torch here."""

from __future__ import annotations

import csv
import json
import sys
from typing import Any


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
    Console(soft_wrap=True).print(t)


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
        print(f"promotion: {verdict} at {decision['target']} ({decision['metric']}: new {decision['new']:.4f}, "
              f"old {old})")


def print_confusion(classes: list[str], cm: list[list[int]]) -> None:
    """Rows are true classes, columns predictions; columns are numbered so long names stay readable."""
    label = max(len(f"{i} {c}") for i, c in enumerate(classes)) + 2
    cell = max(4, len(str(len(classes) - 1)) + 1, max(len(str(v)) for row in cm for v in row) + 1)
    print("\nconfusion matrix (rows: true class, columns: predicted class index)")
    print("".ljust(label) + "".join(str(i).rjust(cell) for i in range(len(classes))))
    for i, (c, row) in enumerate(zip(classes, cm)):
        print(f"{i} {c}".ljust(label) + "".join(str(v).rjust(cell) for v in row))


def print_rows(rows: list[dict], fmt: str, top_k: int) -> None:
    if fmt == "json":
        print_json(rows)
        return
    if fmt == "csv":
        w = csv.writer(sys.stdout)
        header = ["path"]
        for i in range(1, top_k + 1):
            header += [f"class_{i}", f"prob_{i}"] if top_k > 1 else ["class", "prob"]
        w.writerow(header)
        for r in rows:
            w.writerow([r["path"]] + [v for p in r["top"] for v in (p["class"], f"{p['prob']:.6f}")])
        return
    for r in rows:
        preds = "  ".join(f"{p['class']} {p['prob']:.4f}" for p in r["top"])
        print(f"{r['path']}\t{preds}")
