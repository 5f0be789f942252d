"""train.minutes: a time budget that re-plans the schedule's length from the measured epoch times."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from vae_cli.core import recipe as R
from vae_cli.core.console import Reporter
from vae_cli.core.errors import UsageError
from vae_cli.engine import loop
from vae_cli.engine import state as S
from vae_cli.engine.distributed import Dist
from vae_cli.engine.schedule import plan_epochs
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


def test_eval_every_fills_the_test_columns_every_n_epochs_and_on_the_last(tmp_path):
    """train.eval_every=3 over 4 epochs: test numbers on epoch 3 and on the last (4), blank cells on 1 and 2;
    the evaluations left out change nothing that is trained (the same weights and test numbers as evaluating
    every epoch), and the report still draws its curves."""
    a, rows = _run(tmp_path, "sparse", "train.eval_every=3")
    b, every = _run(tmp_path, "plain")
    assert [r["test_elbo"] != "" for r in rows] == [False, False, True, True]
    assert [r["test_elbo"] for r in rows[2:]] == [r["test_elbo"] for r in every[2:]]
    assert all(r["test_elbo"] != "" for r in every)
    wa, wb = load_file(a.paths["weights"]), load_file(b.paths["weights"])
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert Path(a.paths["curves"]).stat().st_size > 0


@pytest.mark.parametrize("every, epoch, set_aside", [
    (1, 3, 6.0),  # every epoch evaluated (the default): this epoch's coming evaluation, as before the key
    (5, 3, 6.0 * 4 / 5),  # no evaluation now: the rest of the one the last epoch will have
    (5, 5, 6.0 * 4 / 5 + 6.0),  # an evaluation now, and the rest of the last one's
])
def test_a_budget_paces_epochs_with_their_share_of_the_evaluations(monkeypatch, every, epoch, set_aside):
    """train.minutes with train.eval_every: an epoch costs its training plus 1/N of the last measured
    evaluation (6 s here), and the evaluations still to come are set aside from what is left."""
    seen = {}
    monkeypatch.setattr(loop, "plan_epochs", lambda done, spent, last, budget, cap: seen.update(
        done=done, spent=spent, last=last, budget=budget) or 9)
    tc = SimpleNamespace(minutes=10.0, eval_every=every, epochs=20)
    fake = SimpleNamespace(recipe=SimpleNamespace(train=tc), d=Dist(), rt=SimpleNamespace(device=torch.device("cpu")),
                           progress=S.Progress(epoch=epoch, spent_seconds=100.0, eval_seconds=6.0), planned=20,
                           reporter=SimpleNamespace(log=lambda line: seen.update(log=line)),
                           _set_plan=lambda e: seen.update(plan=e))
    loop.Loop._replan(fake, 50.0)
    # the log line names the pace and what it is made of
    assert f"pace {50 + 6 / every:.0f}s: 50s of steps + {6 / every:.0f}s of evaluation" in seen["log"]
    assert fake.progress.spent_seconds == 150.0  # the training time; the evaluation adds its own when it runs
    assert seen["spent"] == pytest.approx(150.0 + set_aside)
    assert seen["last"] == pytest.approx(50.0 + 6.0 / every)
    assert (seen["done"], seen["budget"], seen["plan"]) == (epoch, 600.0, 9)


def test_a_run_stopped_before_an_upgrade_resumes_after_it(tmp_path):
    """A state file written before a recipe key existed (here train.eval_every, removed from its saved recipe)
    resumes: the key's default is the old behaviour, so it is no difference; a changed value still is one."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    res, _ = _run(tmp_path, "old", "epochs=2")
    path = res.run.state
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    saved = json.loads(meta["recipe"])
    del saved["train"]["eval_every"]
    save_file(tensors, str(path), metadata={**meta, "recipe": json.dumps(saved)})
    again, rows = _run(tmp_path, "old", "epochs=2", resume=True)
    assert again.epochs == 2 and len(rows) == 2
    with pytest.raises(UsageError, match="train.eval_every"):
        _run(tmp_path, "old", "epochs=2", "train.eval_every=2", resume=True)
