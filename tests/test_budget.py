"""train.minutes: a time budget that re-plans the schedule's length from the measured epoch times."""

from __future__ import annotations

import csv

import pytest
import torch
from safetensors.torch import load_file

from vae_cli.core import recipe as R
from vae_cli.core.console import Reporter
from vae_cli.engine import loop
from vae_cli.engine import state as S
from vae_cli.engine.loop import plan_epochs
from vae_cli.engine.train import train

from .conftest import TINY


@pytest.mark.parametrize("done, spent, last, budget, cap, want", [
    (1, 60.0, 60.0, 600.0, 100, 10),  # nine more 60 s epochs fit in the 540 s left
    (1, 60.0, 60.0, 6000.0, 20, 20),  # train.epochs caps the plan
    (3, 700.0, 200.0, 600.0, 20, 3),  # over budget: stop after the epoch just done, never fewer
    (2, 100.0, 80.0, 300.0, 20, 4),  # the last epoch's pace (80 s), not the mean (50 s): 2 more, not 4
    (5, 0.0, 0.0, 60.0, 8, 8),  # a zero-time epoch does not divide by zero
])
def test_plan_epochs(done, spent, last, budget, cap, want):
    assert plan_epochs(done, spent, last, budget, cap) == want


def _run(tmp_path, name, *overrides, resume=False):
    r = R.load(TINY, ["train.device=cpu", "train.precision=fp32", "epochs=4", *overrides])
    res = train(r, out=tmp_path, name=name, reporter=Reporter(quiet=True), exist_ok=resume, resume=resume)
    return res, list(csv.DictReader(open(res.paths["metrics"])))


def test_a_tiny_budget_stops_after_the_first_epoch(tmp_path):
    res, rows = _run(tmp_path, "tiny", "train.minutes=0.000001")
    assert res.epochs == 1 and len(rows) == 1
    _, meta = S.load(res.run.state)
    assert S.Progress(**meta["progress"]).planned_epochs == 1


def test_a_budget_that_fits_every_epoch_changes_nothing(tmp_path):
    """train.epochs caps the plan; the run is then the one without a budget, weight for weight."""
    a, rows = _run(tmp_path, "budget", "train.minutes=600")
    b, _ = _run(tmp_path, "plain")
    assert len(rows) == 4
    wa, wb = load_file(a.paths["weights"]), load_file(b.paths["weights"])
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_the_learning_rate_schedule_follows_the_plan_and_resume_keeps_it(tmp_path, monkeypatch):
    # the machine's speed made the plan 2 epochs of the 4 allowed: the cosine ends at the end of epoch 2
    monkeypatch.setattr(loop, "plan_epochs", lambda done, spent, last, budget, cap: 2)
    res, rows = _run(tmp_path, "plan", "train.minutes=600")
    lr = R.load(TINY, []).train.lr
    assert len(rows) == 2 and float(rows[-1]["lr"]) == pytest.approx(0.05 * lr, rel=1e-3)
    plain = list(csv.DictReader(open(_run(tmp_path, "plain", "epochs=4")[0].paths["metrics"])))
    assert float(plain[1]["lr"]) > 0.4 * lr  # without the re-plan, epoch 2 ends mid-schedule
    # resumed from the state file (a fresh process would re-measure nothing): the plan travels with it
    monkeypatch.undo()
    again, rows2 = _run(tmp_path, "plan", "train.minutes=600", resume=True)
    assert again.epochs == 2 and len(rows2) == 2
    wa, wb = load_file(res.paths["weights"]), load_file(again.paths["weights"])
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
