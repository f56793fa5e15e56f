"""A trial stopped mid-run resumes at its next epoch from its checkpoint, and ends where
the same configuration trained without a stop ends."""

import shlex
import signal

import pytest
from optuna.trial import TrialState

from fmnist_sweep.cli import main
from tests.helpers import Forked, epochs_logged, lr_sweep, mlflow_runs, stop_when, trials

EPOCHS = 10


def _stop_after_epoch(args, workdir, epochs: int, role="trial") -> Forked:
    """Start the command; SIGTERM it once its (first) trial's or final model's run has logged
    ``epochs`` epochs."""
    proc = Forked(args, workdir)
    stop_when(proc, lambda: max(epochs_logged(workdir, role).values(), default=0) >= epochs, signal.SIGTERM, 300)
    return proc


def test_a_stopped_trial_resumes_at_its_next_epoch_and_ends_as_an_unstopped_one(tiny_overrides, workdir, tmp_path):
    # Batches of 2: epochs long enough for the test to see the third one logged and stop the
    # trial before its tenth, however busy the machine.
    line = [f"sweep={lr_sweep(tmp_path, 1)}", *tiny_overrides, f"trainer.epochs={EPOCHS}", "trainer.batch_size=2",
            "model.dropouts=0.3",
            "trainer.lr_schedule=onecycle", "trainer.augment.shift=2"]
    stopped = _stop_after_epoch(line, workdir, 3)
    assert stopped.returncode == 143, ("stopped at epoch 3 of 20?", stopped.returncode, stopped.stderr.read())
    first, waiting = trials(workdir, "mine")  # the stopped trial, and its retry re-queued
    assert first.state == TrialState.FAIL and waiting.state == TrialState.WAITING

    assert main(line) == 0  # the same command: the retry resumes from the stopped run's checkpoint
    ts = trials(workdir, "mine")
    (retry,) = [t for t in ts if t.state == TrialState.COMPLETE]
    client, runs = mlflow_runs(workdir, "mine")
    (old,) = [r for r in runs if r.data.tags.get("optuna.trial_number") == str(first.number)]
    (new,) = [r for r in runs if r.data.tags.get("optuna.trial_number") == str(retry.number)]
    k = int(new.data.tags["fmnist.resumed_at_epoch"])
    assert new.data.tags["fmnist.resumed_from_run"] == old.info.run_id and 2 <= k < EPOCHS
    history = client.get_metric_history(new.info.run_id, "val/loss")
    assert sorted(m.step for m in history) == list(range(1, EPOCHS + 1))  # no epoch twice
    before = {m.step: m.value for m in client.get_metric_history(old.info.run_id, "val/loss")}
    assert all(m.value == before[m.step] for m in history if m.step <= k)
    assert sorted(retry.intermediate_values) == list(range(1, EPOCHS + 1))
    for run in (old, new):  # study.checkpoints=delete: nothing left once the trial is done
        assert "checkpoint" not in [a.path for a in client.list_artifacts(run.info.run_id)]

    # The same configuration, trained in one go as a single run.
    assert main(shlex.split(retry.user_attrs["overrides"])) == 0
    _, (single,) = mlflow_runs(workdir)
    for metric in ("val/loss", "val/accuracy", "test/accuracy"):
        assert new.data.metrics[metric] == pytest.approx(single.data.metrics[metric], abs=1e-4), metric


def test_a_stopped_final_model_resumes_when_finalize_runs_again(tiny_overrides, workdir, tmp_path):
    line = [f"sweep={lr_sweep(tmp_path, 1)}", *tiny_overrides, "trainer.epochs=2"]
    assert main(line) == 0
    final = ["finalize", "mine", "--top-k", "1", "--seeds", "1", *line[1:], f"trainer.epochs={EPOCHS}",
             "trainer.batch_size=4"]
    stopped = _stop_after_epoch(final, workdir, 3, role="final")
    assert stopped.returncode == 143, stopped.stderr.read()
    assert main(final) == 0
    client, runs = mlflow_runs(workdir, "mine")
    old, new = [r for r in runs if r.data.tags.get("fmnist.role") == "final"]
    assert old.info.status == "KILLED" and new.info.status == "FINISHED"
    assert new.data.tags["fmnist.resumed_from_run"] == old.info.run_id
    assert 2 <= int(new.data.tags["fmnist.resumed_at_epoch"]) < EPOCHS
    assert sorted(m.step for m in client.get_metric_history(new.info.run_id, "train/loss")) == list(
        range(1, EPOCHS + 1))
    assert "test/accuracy" in new.data.metrics and client.get_model_version("fmnist-mine", "1")
