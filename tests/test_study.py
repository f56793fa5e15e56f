"""Studies through the CLI on tiny data, checked in the Optuna storage and the MLflow store."""

import contextlib
import datetime
import os
import signal
from pathlib import Path
import time

import optuna
import torch
import pytest
from optuna.trial import TrialState

from fmnist_sweep.cli import main
from fmnist_sweep.config import compose, flat_keys, group_options, resource_dir
from fmnist_sweep.space import SearchSpace
from fmnist_sweep.sweep import load_sweep, sweep_names
from tests.helpers import (RECORD, Forked, epochs_logged, lr_sweep, made_study, mlflow_runs, run_cli, stop_when,
                           storage, sweep_file, trials)


def test_four_trial_study_records_storage_and_mlflow_contract(tiny_overrides, workdir, capsys):
    args = ["+experiment=quickstart", *tiny_overrides, "study.n_trials=4", "trainer.epochs=2",
            "data.train_fraction=1.0", *RECORD]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "4/4 done" in out and "best trial" in out and "re-run: python -m fmnist_sweep " in out
    ts = trials(workdir, "quickstart")
    assert len(ts) == 4 and all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in ts)
    # The enqueued published configuration ran first.
    assert ts[0].params == {"optimizer": "rmsprop", "optimizer.lr": 0.001, "model.activation": "tanh",
                            "trainer.batch_size": 100}

    client, runs = mlflow_runs(workdir, "quickstart")
    parents = [r for r in runs if r.data.tags.get("fmnist.role") == "study"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    assert len(parents) == 1 and len(children) == 4
    parent = parents[0]
    for t in ts:
        (child,) = [c for c in children if c.info.run_id == t.user_attrs["mlflow_run_id"]]
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.data.tags["optuna.study"] == "quickstart"
        assert child.data.tags["optuna.trial_number"] == str(t.number)
        assert child.data.tags["optuna.state"] == t.state.name
        assert child.info.status == {"COMPLETE": "FINISHED", "PRUNED": "KILLED"}[t.state.name]
        assert child.data.params["optimizer.lr"] == str(t.params["optimizer.lr"])
        assert "sweep=null" in child.data.tags["fmnist.overrides"]
    # tracking.log_models=best: an MLflow Model from each trial that beat every COMPLETE one before it
    beat, best_so_far = set(), None
    for t in ts:
        if t.state == TrialState.COMPLETE and (best_so_far is None or t.value > best_so_far):
            beat.add(t.user_attrs["mlflow_run_id"])
            best_so_far = t.value
    assert {c.info.run_id for c in children if c.outputs.model_outputs} == beat
    files = {f.path for f in client.list_artifacts(parent.info.run_id)}
    assert {"summary.md", "trials.csv", "optimization_history.png", "param_importances.png", "intermediate_values.png",
            "parallel_coordinate.png", "slice.png", "study_plots.html"} <= files
    best = optuna.load_study(study_name="quickstart", storage=storage(workdir)).best_trial
    assert parent.data.tags["best.trial"] == str(best.number)
    assert parent.data.metrics["best/val/accuracy"] == best.value
    assert parent.info.status == "FINISHED"


def test_local_stores_are_in_wal_mode_and_sync_at_checkpoints(tiny_overrides, workdir):
    """The embedded default's two SQLite stores (Optuna's study, MLflow's runs): WAL, so
    workers on one machine read while another writes, and an fsync per checkpoint rather
    than per commit (an epoch's metrics are one commit)."""
    from fmnist_sweep.storage import make_storage
    from fmnist_sweep.tracking import Tracker, store_engine

    cfg = compose(tiny_overrides + ["+experiment=quickstart"])
    engines = {"optuna": make_storage(cfg.storage).engine}
    for _ in range(2):  # a second tracker on the same store (same engine in MLflow's cache)
        engines["mlflow"] = store_engine(Tracker(cfg.tracking.uri, "wal").client)
    for name, engine in engines.items():
        with engine.connect() as c:
            assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal", name
            assert c.exec_driver_sql("PRAGMA synchronous").scalar() == 1, name  # NORMAL


def test_study_report_contour_png_shows_the_two_most_important_of_the_parameters_that_varied(
        tiny_overrides, workdir, tmp_path, capfd, monkeypatch):
    """A parameter the finished trials all share is left out of the contour plots (no empty
    panels, none of Optuna's "unique value length is less than 2" lines); the PNG is one
    panel over the two parameters fANOVA ranks first (a grid of every pair, drawn at PNG
    size, was unreadable); the interactive page keeps every pair."""
    import matplotlib.figure

    drawn, savefig = {}, matplotlib.figure.Figure.savefig

    def spy(fig, fname, *args, **kwargs):  # the labelled axes of each PNG the report saves
        drawn[os.path.basename(fname)] = sorted((ax.get_xlabel(), ax.get_ylabel()) for ax in fig.axes
                                                if ax.get_xlabel())
        return savefig(fig, fname, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    sweep = sweep_file(tmp_path, """
        objective: val/accuracy
        n_trials: 4
        sampler: {name: random, seed: 0}
        params:
          optimizer: choice(adam, sgd)
          optimizer.lr: tag(log, interval(1e-3, 1e-2))
          trainer.batch_size: choice(16, 32)
          model.activation: choice(tanh, relu)
        enqueue:
          - {optimizer: adam, optimizer.lr: 0.001, trainer.batch_size: 16, model.activation: tanh}
          - {optimizer: sgd, optimizer.lr: 0.002, trainer.batch_size: 32, model.activation: tanh}
          - {optimizer: adam, optimizer.lr: 0.004, trainer.batch_size: 32, model.activation: tanh}
          - {optimizer: sgd, optimizer.lr: 0.008, trainer.batch_size: 16, model.activation: tanh}
    """)
    assert main([f"sweep={sweep}", *tiny_overrides, *RECORD]) == 0
    out, err = capfd.readouterr()
    assert "4/4 done" in out
    assert "unique value length" not in out + err
    study = optuna.load_study(study_name="mine", storage=storage(workdir))
    ranked = optuna.importance.get_param_importances(
        study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0),
        params=["optimizer", "optimizer.lr", "trainer.batch_size"])
    assert drawn["contour.png"] == [tuple(sorted(list(ranked)[:2]))]
    client, runs = mlflow_runs(workdir, "mine")
    (parent,) = [r for r in runs if r.data.tags.get("fmnist.role") == "study"]
    files = {f.path for f in client.list_artifacts(parent.info.run_id)}
    assert "contour.png" in files and "plot_notes.txt" not in files
    html = Path(client.download_artifacts(parent.info.run_id, "study_plots.html", str(tmp_path))).read_text()
    contour = html[html.index("<h2>contour</h2>"):]
    assert all(p in contour for p in ("optimizer.lr", "trainer.batch_size", '"optimizer"'))
    assert "model.activation" not in contour


def test_trial_override_line_reruns_the_trial_as_a_single_run(tiny_overrides, workdir):
    sweep = sweep_file(workdir, """
        objective: val/accuracy
        n_trials: 1
        sampler: {name: random, seed: 3}
        params:
          optimizer.lr: tag(log, interval(1e-3, 1e-2))
    """)
    assert main([f"sweep={sweep}", *tiny_overrides]) == 0
    (t,) = trials(workdir, "mine")
    # tracking.plots=false, tracking.log_models=none: tables and weights, no PNG and no MLflow Model
    client, (parent, trial_run) = mlflow_runs(workdir, "mine")
    files = {f.path for f in client.list_artifacts(trial_run.info.run_id)} | {
        f.path for f in client.list_artifacts(trial_run.info.run_id, "weights")}
    assert "weights/state_dict.pt" in files and not trial_run.outputs.model_outputs
    assert [f for f in files if f.startswith("classification_report_")]
    parent_files = {f.path for f in client.list_artifacts(parent.info.run_id)}
    assert "trials.csv" in parent_files and not [f for f in files | parent_files if f.endswith((".png", ".html"))]
    assert main(t.user_attrs["overrides"].split()) == 0
    client, runs = mlflow_runs(workdir)  # the re-run is a plain run in the default experiment
    assert runs[0].data.metrics["val/accuracy"] == t.value


def test_pruned_trials_keep_their_partial_curves(tiny_overrides, workdir, tmp_path):
    sweep = sweep_file(tmp_path, """
        objective: val/accuracy
        n_trials: 2
        sampler: {name: random, seed: 0}
        pruner: {_target_: optuna.pruners.ThresholdPruner, lower: 2.0}   # accuracy is never >= 2
        params:
          optimizer.lr: tag(log, interval(1e-4, 1e-2))
    """)
    assert main([f"sweep={sweep}", *tiny_overrides, "trainer.epochs=3"]) == 0
    ts = trials(workdir, "mine")
    assert [t.state for t in ts] == [TrialState.PRUNED] * 2
    client, runs = mlflow_runs(workdir, "mine")
    for t in ts:
        run = client.get_run(t.user_attrs["mlflow_run_id"])
        assert run.info.status == "KILLED" and run.data.tags["optuna.state"] == "PRUNED"
        assert len(client.get_metric_history(run.info.run_id, "val/accuracy")) == 1  # of 3 epochs


def test_group_choice_switches_models_and_conditional_params(tiny_overrides, workdir, tmp_path):
    sweep = sweep_file(tmp_path, """
        objective: val/loss
        direction: minimize
        n_trials: 2
        sampler: {name: grid}
        params:
          model: choice(cnn, autoencoder)
          model.latent_dim: choice(8)    # only the autoencoder has one
    """)
    assert main([f"sweep={sweep}", *tiny_overrides]) == 0
    ts = sorted(trials(workdir, "mine"), key=lambda t: t.params["model"])
    assert [t.params for t in ts] == [{"model": "autoencoder", "model.latent_dim": 8}, {"model": "cnn"}]
    client, _ = mlflow_runs(workdir, "mine")
    ae, cnn = (client.get_run(t.user_attrs["mlflow_run_id"]) for t in ts)
    assert ae.data.tags["fmnist.model"] == "autoencoder" and ae.data.params["model.latent_dim"] == "8"
    assert cnn.data.tags["fmnist.model"] == "cnn" and "model.latent_dim" not in cnn.data.params


def test_multi_objective_study(tiny_overrides, workdir, tmp_path):
    sweep = sweep_file(tmp_path, """
        objectives:
          - {metric: val/accuracy, direction: maximize}
          - {metric: model/n_params, direction: minimize}
        n_trials: 3
        sampler: {name: nsga2, seed: 0, population_size: 2}
        params:
          model: choice(cnn, encoder_classifier)
    """)
    assert main([f"sweep={sweep}", *tiny_overrides, "tracking.plots=true"]) == 0
    study = optuna.load_study(study_name="mine", storage=storage(workdir))
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    for t in study.trials:
        assert len(t.values) == 2 and t.values[1] in (305978, 105866)
    client, runs = mlflow_runs(workdir, "mine")
    parent = next(r for r in runs if r.data.tags.get("fmnist.role") == "study")
    assert "pareto_front.png" in {f.path for f in client.list_artifacts(parent.info.run_id)}


def test_duplicate_config_takes_the_finished_result(tiny_overrides, workdir, tmp_path):
    sweep = sweep_file(tmp_path, """
        objective: val/accuracy
        n_trials: 2
        sampler: {name: random, seed: 0}
        params:
          optimizer.lr: choice(0.001)
    """)
    assert main([f"sweep={sweep}", *tiny_overrides]) == 0
    first, second = trials(workdir, "mine")
    assert second.user_attrs["duplicate_of"] == 0 and second.value == first.value
    client, _ = mlflow_runs(workdir, "mine")
    twin = client.get_run(second.user_attrs["mlflow_run_id"])
    assert twin.data.tags["fmnist.duplicate_of_trial"] == "0"
    assert "perf/train_seconds" not in twin.data.metrics  # not trained again


def test_resume_adds_more_and_refuses_a_changed_space(tiny_overrides, workdir, tmp_path, capsys):
    text = """
        objective: val/accuracy
        n_trials: 2
        sampler: {name: random, seed: 0}
        params:
          optimizer.lr: tag(log, interval(1e-4, 1e-2))
    """
    sweep = sweep_file(tmp_path, text)
    args = [f"sweep={sweep}", *tiny_overrides]
    assert main(args) == 0 and len(trials(workdir, "mine")) == 2
    assert main(args) == 0 and len(trials(workdir, "mine")) == 2  # already complete: nothing runs
    assert "2 of 2 trials already done" in capsys.readouterr().out
    assert main(args + ["--more", "1"]) == 0 and len(trials(workdir, "mine")) == 3
    # the added trial is drawn anew, not the first session's first draw again (a duplicate)
    assert len({t.params["optimizer.lr"] for t in trials(workdir, "mine")}) == 3

    sweep_file(tmp_path, text.replace("1e-4", "1e-5"))
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "created with another search space" in err and "--fork" in err
    assert main(args + ["--fork"]) == 0
    names = optuna.get_all_study_names(storage(workdir))
    forked = [n for n in names if n.startswith("mine-")]
    assert len(forked) == 1 and len(trials(workdir, forked[0])) == 2
    _, runs = mlflow_runs(workdir, "mine")
    assert len([r for r in runs if r.data.tags.get("fmnist.role") == "study"]) == 1


def test_two_workers_on_a_grid_study_run_every_point_once(tiny_overrides, workdir, tmp_path):
    """A grid's seed orders the grid, so the workers of a grid study share it (trial k is
    point k): seeded per worker like the other samplers, two workers ran some points twice
    and never ran others."""
    sweep = sweep_file(tmp_path, """
        objective: val/accuracy
        sampler: {name: grid}
        params:
          optimizer.lr: choice(0.001, 0.002, 0.003, 0.004)
    """)
    proc = run_cli(["workers", "-n", "2", f"sweep={sweep}", *tiny_overrides])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[w1]" in proc.stdout
    done = [t for t in trials(workdir, "mine") if t.state == TrialState.COMPLETE]
    assert {t.params["optimizer.lr"] for t in done} == {0.001, 0.002, 0.003, 0.004}
    assert len(done) <= 4 + 1  # up to workers - 1 more: the grid's last point, still running, drawn again


def _start_and_stop_mid_trial(args, workdir, sig):
    """Start the study's command, send ``sig`` while a trial after a complete one trains (its
    MLflow run has logged one to three epochs), however slow the machine; the process. The
    trial's other epochs (five or more), test pass and record are the test's window: each look
    is one query per store."""
    proc, made = Forked(args, workdir), []

    def mid_trial() -> bool:
        if not made and (study := made_study(workdir, "mine")):
            made.append(study)
        ts = made[0].get_trials(deepcopy=False) if made else []
        logged = epochs_logged(workdir)
        return any(t.state == TrialState.COMPLETE for t in ts) and any(
            t.state == TrialState.RUNNING and 0 < logged.get(str(t.number), 0) <= 3 for t in ts)

    stop_when(proc, mid_trial, sig)
    return proc


def test_ctrl_c_then_kill_9_then_the_same_command_ends_the_study_at_once_to_its_budget(tiny_overrides, workdir,
                                                                                      tmp_path):
    """Ctrl-C mid-trial: exit 130 and one line on stderr, nothing else. Then the same command,
    killed with -9 mid-trial (a laptop that crashed). Then the same command again: the dead
    process's trial is failed and re-queued at once (its process is gone from this host), not
    after the heartbeat's grace period (120 s on the embedded default); both stopped
    configurations run again, the Ctrl-C'd one reported as interrupted; the study ends with its
    budget and no MLflow run left RUNNING."""
    args = [f"sweep={lr_sweep(tmp_path, 4)}", *tiny_overrides, "trainer.epochs=8"]
    proc = _start_and_stop_mid_trial(args, workdir, signal.SIGINT)
    out, err = proc.stdout.read(), proc.stderr.read()
    assert proc.returncode == 130, out + err
    assert err.splitlines() == ["interrupted: the MLflow run is marked KILLED; a study resumes with the same command"]
    assert "Traceback" not in out and "no complete trials" not in out
    (stopped,) = [t for t in trials(workdir, "mine") if t.state == TrialState.FAIL]

    assert _start_and_stop_mid_trial(args, workdir, signal.SIGKILL).returncode == -signal.SIGKILL
    killed = next(t for t in trials(workdir, "mine") if t.state == TrialState.RUNNING)
    resumed = datetime.datetime.now()
    done = run_cli(args, workdir)
    assert done.returncode == 0, done.stderr
    assert "1 interrupted" in done.stdout
    ts = trials(workdir, "mine")
    # Failed by the resumed process's own recovery, before the heartbeat's grace period could have.
    grace = compose(args).storage.grace_period
    failed_after = (ts[killed.number].datetime_complete - resumed).total_seconds()
    assert failed_after < grace, ("the resumed study waited for the heartbeat's grace period", failed_after, grace)
    counted = [t for t in ts if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(counted) == 4
    assert [t.number for t in ts if t not in counted] == sorted({stopped.number, killed.number})  # failed, and retried:
    retried = [t for t in ts if killed.number in optuna.storages.RetryHeartbeatStaleTrialCallback.retry_history(t)]
    assert len(retried) == 1 and retried[0].params == killed.params
    assert [t for t in counted if t.params == stopped.params]
    client, runs = mlflow_runs(workdir, "mine")
    assert len([r for r in runs if r.data.tags.get("fmnist.role") == "study"]) == 1
    assert not [r for r in runs if r.info.status == "RUNNING"]
    (run,) = [r for r in runs if r.data.tags.get("optuna.trial_number") == str(killed.number)]
    assert run.info.status == "KILLED" and run.data.tags["optuna.state"] == "FAIL"


def test_sigterm_to_workers_is_a_clean_stop_and_one_worker_finishes_the_budget(tiny_overrides, workdir, tmp_path):
    """SIGTERM (a scheduler's stop) to `workers -n 2` mid-trial: it passes the signal on, prints
    one line and exits 143; each stopped trial is re-queued with its parameters, counted as
    interrupted, not failed, and no MLflow run stays RUNNING. One worker then finishes the budget."""
    sweep = lr_sweep(tmp_path, 3)
    line = [f"sweep={sweep}", *tiny_overrides, "trainer.epochs=8"]
    proc = _start_and_stop_mid_trial(["workers", "-n", "2", *line], workdir, signal.SIGTERM)
    out, err = proc.stdout.read(), proc.stderr.read()
    assert proc.returncode == 143, out + err
    assert err.splitlines() == ["stopped by SIGTERM: the MLflow run is marked KILLED; a study resumes with the same "
                                "command"], err
    assert "Traceback" not in out, out
    ts = trials(workdir, "mine")
    stopped = [t for t in ts if t.state == TrialState.FAIL]
    why = [(t.number, t.state.name, t.user_attrs) for t in ts], out  # (what a failure here shows)
    assert stopped and all(t.user_attrs.get("fmnist.interrupted") == t.number for t in stopped), why
    assert not [t for t in ts if t.state == TrialState.RUNNING], why
    waiting = [t.params for t in ts if t.state == TrialState.WAITING]
    assert all(t.params in waiting for t in stopped)  # re-queued with the same parameters
    _, runs = mlflow_runs(workdir, "mine")
    assert not [r for r in runs if r.info.status == "RUNNING"]
    # (a worker's trial stopped before it made its MLflow run has none)
    stopped_runs = [r for r in runs if r.data.tags.get("optuna.trial_number") in {str(t.number) for t in stopped}]
    assert stopped_runs and all(r.info.status == "KILLED" and "interrupted (SIGTERM)" in r.data.tags["fmnist.failure"]
                                for r in stopped_runs), ([(r.data.tags.get("optuna.trial_number"), r.info.status, {
                                    k: v for k, v in r.data.tags.items() if k.startswith(("fmnist.f", "optuna.s"))})
                                    for r in stopped_runs], why)

    done = run_cli(line, workdir)
    assert done.returncode == 0, done.stderr
    assert f"0 failed, {len(stopped)} interrupted" in done.stdout
    ts = trials(workdir, "mine")
    assert len([t for t in ts if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]) >= 3
    assert not [r for r in mlflow_runs(workdir, "mine")[1] if r.info.status == "RUNNING"]


def _stopped_in_a_finalizer(ready, err: str) -> None:
    """A process that takes stop signals as a command does, is signalled while a finalizer runs
    (where Python drops the exception), then trains; its exit code is 128 + the signal its training
    stopped on, or 0 if it trained to the end; what it prints on standard error goes to ``err``."""
    import sys

    from fmnist_sweep import errors
    from fmnist_sweep.data import Split
    from fmnist_sweep.models.cnn import CNN
    from fmnist_sweep.train import train_epoch

    sys.stderr = open(err, "w", buffering=1)
    # Ctrl-C as in a terminal: a child of the fork server inherits an ignored SIGINT where the
    # server was started by a process that ignored it
    signal.signal(signal.SIGINT, signal.default_int_handler)
    errors.stop_on_signals()

    class Finalized:
        def __del__(self):
            ready.set()
            time.sleep(5)  # the signal lands here

    Finalized()
    model = CNN(widths=(4,), dropouts=0.1)
    split = Split(torch.rand(64, 1, 28, 28), torch.randint(0, 10, (64,)))
    try:
        train_epoch(model, torch.optim.SGD(model.parameters(), lr=0.01), split, 8, torch.Generator(),
                    contextlib.nullcontext, False, lambda *_: None)
    except KeyboardInterrupt as e:
        os._exit(128 + errors.stop_signal(e))
    os._exit(0)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_that_lands_in_a_finalizer_still_stops_the_training(sig, tmp_path):
    """Python drops an exception raised in a finalizer (garbage collection runs SQLAlchemy's weakref
    callbacks at any moment) and would print it as "Exception ignored in ...", a traceback: the
    process prints nothing, and the training's next batch raises the stop instead."""
    from fmnist_sweep import forks

    ctx = forks.context()
    ready, err = ctx.Event(), tmp_path / "stderr"
    proc = ctx.Process(target=_stopped_in_a_finalizer, args=(ready, str(err)))
    proc.start()
    assert ready.wait(60)
    time.sleep(0.2)  # inside the finalizer's sleep
    os.kill(proc.pid, sig)
    proc.join(60)
    assert proc.exitcode == 128 + sig
    assert err.read_text() == ""


def _stopped_in_optunas_tell(argv: list[str], cwd: str, out: str, after_write: bool) -> None:
    """The study command, signalled (SIGTERM) while Optuna's tell writes the first trial's final
    state, at our storage seam (before or after the write itself); exits with the command's code,
    its output in ``out`` and ``out``.err."""
    import sys

    from fmnist_sweep import errors, storage
    from fmnist_sweep.cli import main

    sys.stdout, sys.stderr = open(out, "w", buffering=1), open(out + ".err", "w", buffering=1)
    errors.stop_on_signals()
    write = storage.WorkerStorage.set_trial_state_values

    def stopped_mid_write(self, trial_id, state, values=None):
        if state.is_finished() and not after_write:
            os.kill(os.getpid(), signal.SIGTERM)  # (once: the handler ignores a second one)
        taken = write(self, trial_id, state, values)
        if state.is_finished() and after_write:
            os.kill(os.getpid(), signal.SIGTERM)
        return taken

    storage.WorkerStorage.set_trial_state_values = stopped_mid_write
    os.chdir(cwd)
    os._exit(main(argv))


@pytest.mark.parametrize("after_write", [False, True], ids=["before-the-write", "after-the-write"])
def test_a_stop_signal_inside_optunas_tell_is_a_clean_stop(after_write, tiny_overrides, workdir, tmp_path):
    """Optuna's trial loop meets a stop during its tell with an error of its own (the stop is
    that error's context): the process still stops as on any stop signal, one line and exit 143.
    A trial whose result had not reached the storage is re-queued; one whose result had keeps it."""
    from fmnist_sweep import forks

    out = tmp_path / "out"
    args = [f"sweep={lr_sweep(tmp_path, 2)}", *tiny_overrides]
    proc = forks.context().Process(target=_stopped_in_optunas_tell, args=(args, str(workdir), str(out), after_write))
    proc.start()
    proc.join(120)
    err = Path(str(out) + ".err").read_text()
    assert proc.exitcode == 143, out.read_text() + err
    assert err.splitlines() == ["stopped by SIGTERM: the MLflow run is marked KILLED; a study resumes with the same "
                                "command"], err
    ts = trials(workdir, "mine")
    if after_write:
        assert [t.state for t in ts] == [TrialState.COMPLETE]
    else:
        (stopped, requeued) = ts
        assert stopped.state == TrialState.FAIL and stopped.user_attrs["fmnist.interrupted"] == 0
        assert requeued.state == TrialState.WAITING and requeued.params == stopped.params
    _, runs = mlflow_runs(workdir, "mine")
    assert not [r for r in runs if r.info.status == "RUNNING"]
    (trial_run,) = [r for r in runs if "optuna.trial_number" in r.data.tags]
    assert trial_run.data.tags["optuna.state"] == ts[0].state.name
    if not after_write:  # its run finished training, but the trial runs again: the run says it was stopped
        assert trial_run.info.status == "KILLED" and "interrupted (SIGTERM)" in trial_run.data.tags["fmnist.failure"]


def test_read_only_commands_leave_the_record_as_it_was(tiny_overrides, workdir, tmp_path, capsys):
    """status, report and compare on a finished study: every run's status and the study's
    trials stay as they were (the parent run stays FINISHED)."""
    args = [f"sweep={lr_sweep(tmp_path, 2)}", *tiny_overrides]
    assert main(args) == 0
    client, runs = mlflow_runs(workdir, "mine")
    before = {r.info.run_id: r.info.status for r in runs}
    study_before = [(t.number, t.state, t.user_attrs) for t in trials(workdir, "mine")]
    assert "FINISHED" in before.values()
    for command in (["status", "mine"], ["report", "mine"], ["compare", "mine"]):
        assert main(command) == 0, capsys.readouterr().err
    _, runs = mlflow_runs(workdir, "mine")
    assert {r.info.run_id: r.info.status for r in runs} == before
    assert [(t.number, t.state, t.user_attrs) for t in trials(workdir, "mine")] == study_before


def test_hydra_optuna_sweeper_params_block_parses_unchanged():
    # A params block as the plugin's documentation writes it.
    space = SearchSpace({"x": "range(-5.5, 5.5, step=0.5)", "y": "choice(-5, 0, 5)",
                         "lr": "tag(log, interval(0.001, 1))", "n": "int(interval(1, 10))",
                         "db": "choice(mysql, postgresql)", "fixed": "42"})
    d = space.values
    assert (d["x"].low, d["x"].high, d["x"].step) == (-5.5, 5.0, 0.5)
    assert d["y"].choices == (-5, 0, 5) and d["db"].choices == ("mysql", "postgresql")
    assert d["lr"].log and (d["lr"].low, d["lr"].high) == (0.001, 1.0)
    assert (d["n"].low, d["n"].high, d["n"].log) == (1, 10, False)
    assert space.fixed == {"fixed": "42"}


@pytest.mark.parametrize("text,message", [
    ("choice(", "cannot parse"), ("interval(1, 0)", "needs low < high"),
    ("tag(log, interval(0, 1))", "low > 0 for log"),
])
def test_bad_distribution_is_a_clear_error(text, message, tiny_overrides, tmp_path, capsys):
    sweep = sweep_file(tmp_path, f"""
        objective: val/accuracy
        n_trials: 1
        params:
          optimizer.lr: "{text}"
    """)
    assert main([f"sweep={sweep}", *tiny_overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: search space: ") and message in err and err.count("\n") == 1


def test_unknown_study_for_status_and_unknown_sweep(workdir, capsys):
    assert main(["status", "nope"]) == 2
    assert "no study 'nope'" in capsys.readouterr().err
    assert main(["sweep=quickstrat"]) == 2
    err = capsys.readouterr().err
    assert "unknown sweep 'quickstrat'" in err and "Did you mean quickstart?" in err


def _hydra_whole(line):
    """Hydra's own composition of a whole line, resolved (what compose() must equal)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(resource_dir("conf")), version_base="1.3", job_name="t"):
        cfg = hydra_compose(config_name="config", overrides=line)
    return OmegaConf.to_container(cfg, resolve=True)


@pytest.mark.parametrize("line", [
    ["model=resnet", "optimizer.lr=0.5", "model=cnn", "optimizer.lr=0.25"],  # the last of each wins
    ["model.widths=[8,16,32]", "model.dropouts=0.1", "trainer.ema=null", "seed=${trainer.epochs}"],
    ["+experiment=quickstart", "++optimizer.lr=0.5", "optimizer.lr=0.75"],  # (an edit beside: Hydra whole)
    ["~seed", "+seed=3", "model=rnn"],
])
def test_a_line_composes_as_hydra_composes_it_whole(line):
    """Group choices, value changes in order, lists, null, interpolation, and +/++/~ edits: the
    configuration Hydra composes from the whole line, and a change to it is the caller's alone."""
    from omegaconf import OmegaConf

    cfg = compose(line)
    assert OmegaConf.to_container(cfg) == _hydra_whole(line)
    cfg.optimizer.lr = -1.0
    assert compose(line).optimizer.lr != -1.0


@pytest.mark.parametrize("experiment", [e for e in group_options("experiment") if not e.startswith("keras_")])
def test_every_experiment_and_its_sweep_composes_a_trial(experiment):
    """Every sweep's trials (group choices, conditional values, a user's value before them)
    compose, each to Hydra's own composition of its whole line."""
    from omegaconf import OmegaConf

    cfg = compose([f"+experiment={experiment}"])
    sweep = load_sweep(cfg.sweep)
    study = optuna.create_study(directions=[d for _, d in sweep.objectives], sampler=optuna.samplers.RandomSampler(0))
    base = [f"+experiment={experiment}", "trainer.epochs=2", "sweep=null"]
    for _ in range(4):
        trial = study.ask()
        overrides = sweep.space.suggest(trial, lambda o: set(flat_keys(compose(base + o))))
        trial_cfg = compose(base + overrides)
        assert trial_cfg.sweep is None and trial_cfg.trainer.test is False and trial_cfg.trainer.epochs == 2
        assert OmegaConf.to_container(trial_cfg) == _hydra_whole(base + overrides), base + overrides
        trial_cfg.seed = -1  # callers change their copy (a study turns trainer.progress off): not the next one's
        study.tell(trial, [0.5] * len(sweep.objectives))


def test_every_sweep_file_has_an_experiment():
    # The experiments without a sweep are the single-run reproduction presets.
    single = {e for e in group_options("experiment") if compose([f"+experiment={e}"]).sweep is None}
    assert single == {"keras_cnn", "keras_rnn", "keras_bilstm"}
    assert sorted(sweep_names()) == sorted(set(group_options("experiment")) - single)


def test_pretrained_autoencoder_is_trained_once_and_reused(tiny_overrides, workdir, capsys):
    common = [*tiny_overrides, "model=encoder_classifier", "model.latent_dim=8", "optimizer=adam",
              "model.pretrained=autoencoder", "model.freeze=true"]
    assert main(common) == 0
    assert "pretraining an autoencoder" in capsys.readouterr().out
    assert main(common + ["optimizer.lr=0.002"]) == 0  # same autoencoder config, other classifier
    assert "pretraining an autoencoder" not in capsys.readouterr().out  # found by fingerprint
    client, runs = mlflow_runs(workdir)
    pre = [r for r in runs if r.data.tags.get("fmnist.role") == "pretraining"]
    clf = [r for r in runs if r.data.tags.get("fmnist.model") == "encoder_classifier"]
    assert len(pre) == 1 and len(clf) == 2
    assert pre[0].data.tags["fmnist.model"] == "autoencoder" and pre[0].data.params["model.latent_dim"] == "8"
    ae = torch.load(client.download_artifacts(pre[0].info.run_id, "weights/state_dict.pt"), weights_only=True)
    for r in clf:
        state = torch.load(client.download_artifacts(r.info.run_id, "weights/state_dict.pt"), weights_only=True)
        assert all(torch.equal(ae[k], state[k]) for k in ae if k.startswith("encoder."))


@pytest.mark.parametrize("sampler", ["tpe", "random", "grid", "cmaes", "gp", "nsga2",
                                     "_target_: optuna.samplers.QMCSampler"])
@pytest.mark.parametrize("pruner", ["median", "percentile", "successive_halving", "hyperband", "none"])
def test_every_sampler_and_pruner_drives_a_study(sampler, pruner, tmp_path):
    from fmnist_sweep.sweep import load_sweep, make_pruner, make_sampler

    spec = f"{{{sampler}}}" if sampler.startswith("_target_") else f"{{name: {sampler}}}"
    sweep = load_sweep(str(sweep_file(tmp_path, f"""
        objective: val/loss
        direction: minimize
        n_trials: 4
        sampler: {spec}
        pruner: {{name: {pruner}}}
        params:
          optimizer.lr: choice(0.001, 0.01)
          model.dropout: range(0.0, 0.5, step=0.25)
    """)))
    study = optuna.create_study(sampler=make_sampler(sweep, 0), pruner=make_pruner(sweep, 3))

    def objective(trial):
        overrides = sweep.space.suggest(trial, lambda o: {"optimizer.lr", "model.dropout"})
        values = dict(o.split("=") for o in overrides)
        for epoch in (1, 2, 3):  # a loss that the pruners can judge
            trial.report(float(values["optimizer.lr"]) * epoch, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return float(values["optimizer.lr"]) + float(values["model.dropout"])

    study.optimize(objective, n_trials=4)
    # every worker of a study seeds its own draws, but a grid's or QMC's workers share one seed
    from fmnist_sweep.sweep import WorkerSeededSampler

    shared = sampler == "grid" or "QMC" in sampler
    assert isinstance(study.sampler, WorkerSeededSampler) != shared
    base = study.sampler if shared else study.sampler.base
    assert len(study.trials) == 4 and type(base).__name__.lower().startswith(
        {"grid": "grid", "cmaes": "cmaes", "gp": "gp", "nsga2": "nsgaii", "tpe": "tpe", "random": "random"}
        .get(sampler, "qmc"))


def test_out_of_memory_fails_the_trial_and_the_worker_goes_on(tiny_overrides, workdir, tmp_path, monkeypatch,
                                                               capsys):
    # No GPU here: the CUDA allocator's error is raised where a real one would surface.
    from fmnist_sweep import train

    real, calls = train.train_epoch, []

    def first_call_oom(*a, **k):
        calls.append(1)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*a, **k)

    monkeypatch.setattr(train, "train_epoch", first_call_oom)
    sweep = lr_sweep(tmp_path, 2)
    assert main([f"sweep={sweep}", *tiny_overrides]) == 0
    assert "FAIL (out of device memory at trainer.batch_size=32: lower trainer.batch_size" in capsys.readouterr().out
    ts = trials(workdir, "mine")
    assert [t.state for t in ts] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    client, _ = mlflow_runs(workdir, "mine")
    failed = client.get_run(ts[0].user_attrs["mlflow_run_id"])
    assert failed.info.status == "FAILED" and failed.data.tags["optuna.state"] == "FAIL"


# Where a stop lands: as MLflow writes the first trial's closing tag (optuna.state), in the middle
# of its transaction; as Optuna has read a trial's reported values, its rows not yet fetched; as
# MLflow makes the first trial's run (after the study's parent run), before its id comes back; as
# MLflow writes that run's dataset inputs, before its training; as Optuna writes the first
# trial's final state.
STATEMENTS = {
    "optuna write": ("before_cursor_execute", lambda statement, parameters, seen:
                     statement.startswith("UPDATE TRIALS SET STATE") and "COMPLETE" in str(parameters)),
    "mlflow run": ("before_cursor_execute", lambda statement, parameters, seen: statement.startswith(
                   "INSERT INTO RUNS ") and any(s.startswith("INSERT INTO RUNS ") for s in seen)),
    "mlflow inputs": ("before_cursor_execute", lambda statement, parameters, seen:
                      statement.startswith("INSERT INTO INPUTS ")),
    "mlflow write": ("before_cursor_execute", lambda statement, parameters, seen: "optuna.state" in str(parameters)
                     and statement.startswith(("INSERT", "UPDATE"))),
    "optuna read": ("after_cursor_execute", lambda statement, parameters, seen: statement.startswith("SELECT")
                    and "TRIAL_INTERMEDIATE_VALUES" in statement
                    and any(s.startswith("INSERT INTO TRIAL_INTERMEDIATE_VALUES") for s in seen)),
}


def _signal_at(when: str, lands) -> None:
    """SIGTERM to this process at the first database statement (of either store) that ``lands``
    says, seen at the SQLAlchemy event ``when``."""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    seen = []

    def signalled(conn, cursor, statement, parameters, context, executemany):
        statement = statement.lstrip().upper()
        if lands(statement, parameters, seen):
            os.kill(os.getpid(), signal.SIGTERM)  # (once: the handler ignores a second one)
        seen.append(statement)

    event.listen(Engine, when, signalled)  # every engine of the process: both stores


def _stop_in_a_statement(which: str) -> None:
    """Where STATEMENTS[which] says."""
    _signal_at(*STATEMENTS[which])


def _command(argv: list[str], cwd: str, out: str, arrange, *more) -> None:
    """The study command in this (forked) process, as `python -m fmnist_sweep` runs it, its output
    in ``out`` and ``out``.err, after ``arrange(*more)`` has set up where a stop lands."""
    import sys

    from fmnist_sweep import cli, errors

    sys.stdout, sys.stderr = open(out, "w", buffering=1), open(out + ".err", "w", buffering=1)
    errors.stop_on_signals()
    arrange(*more)
    os.chdir(cwd)
    cli.leave(cli.main(argv))


def _stopped_cleanly(arrange, argv: list[str], workdir, tmp_path, *more) -> None:
    """The study command in a fork, stopped where ``arrange(*more)`` sets it up to signal itself:
    exit 143, the one stop line, no traceback."""
    from fmnist_sweep import forks

    out = tmp_path / "out"
    proc = forks.context().Process(target=_command, args=(argv, str(workdir), str(out), arrange, *more))
    proc.start()
    proc.join(120)
    text, err = out.read_text(), Path(str(out) + ".err").read_text()
    proc.kill()  # (one still running has failed the test)
    assert proc.exitcode == 143, text + err
    assert err.splitlines() == ["stopped by SIGTERM: the MLflow run is marked KILLED; a study resumes with the same "
                                "command"], err
    assert "Traceback" not in text, text


@pytest.mark.parametrize("which", STATEMENTS)
def test_a_stop_signal_inside_a_database_statement_is_a_clean_stop(which, tiny_overrides, workdir, tmp_path):
    """A stop that lands while MLflow makes or writes a run (its SQLite transaction open) or while
    Optuna reads for the pruner waits for that statement: one line, exit 143, no database error or
    traceback, no run left RUNNING."""
    _stopped_cleanly(_stop_in_a_statement, [f"sweep={lr_sweep(tmp_path, 2)}", *tiny_overrides, "trainer.epochs=3"],
                     workdir, tmp_path, which)
    _, runs = mlflow_runs(workdir, "mine")
    assert not [r for r in runs if r.info.status == "RUNNING"]
    (trial_run,) = [r for r in runs if "optuna.trial_number" in r.data.tags]
    first = trials(workdir, "mine")[0]
    if which == "mlflow write":  # the trial had ended: its run has its state
        assert trial_run.data.tags["optuna.state"] == first.state.name
    elif which == "optuna write":  # the state written whole first: the result is kept
        assert first.state == TrialState.COMPLETE and "fmnist.interrupted" not in first.user_attrs
        assert trial_run.info.status == "FINISHED" and trial_run.data.tags["optuna.state"] == "COMPLETE"
    else:  # stopped while it trained: re-queued, its run KILLED as interrupted
        assert first.state == TrialState.FAIL and first.user_attrs.get("fmnist.interrupted") == first.number
        assert trial_run.info.status == "KILLED"
        assert trial_run.data.tags["fmnist.failure"].startswith("interrupted (SIGTERM)")


def _signalled_while_another_thread_writes() -> None:
    """SIGTERM to this process while a background thread is inside a deferred write: the main
    thread stops at once (exit 143), the thread's write is not where the stop waits."""
    import threading
    import time

    from fmnist_sweep import errors

    errors.stop_on_signals()
    inside, done = threading.Event(), threading.Event()

    def writer():
        with errors.stops_deferred():
            inside.set()
            done.wait(30)

    threading.Thread(target=writer, daemon=True).start()
    inside.wait(30)
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)
    except errors.Stopped:
        os._exit(143)
    os._exit(0)


def _stop_as_a_trial_is_created() -> None:
    """SIGTERM just after Optuna's ask has committed the new trial's row, before ask returns it:
    the moment between two trials."""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine
    from sqlalchemy.orm import Session

    created = []

    def seen(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith("INSERT INTO TRIALS "):
            created.append(statement)

    def committed(session):
        if created:
            os.kill(os.getpid(), signal.SIGTERM)  # (once: the handler ignores a second one)

    event.listen(Engine, "after_cursor_execute", seen)
    event.listen(Session, "after_commit", committed)


def _sigterm_around(owner, name: str, after: bool) -> None:
    """SIGTERM to this process as ``owner.name`` is called (``after``: as it returns)."""
    call = getattr(owner, name)

    def signalled(*args, **kwargs):
        if not after:
            os.kill(os.getpid(), signal.SIGTERM)
        result = call(*args, **kwargs)
        if after:
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    setattr(owner, name, signalled)


def _stop_as_a_run_returns() -> None:
    """SIGTERM as the first trial's run returns, finished, to the objective: before Optuna is
    told the trial's result."""
    from fmnist_sweep import record

    _sigterm_around(record, "run", after=True)


def _stop_at_the_first_report() -> None:
    """SIGTERM as the first epoch's report reaches the study."""
    _signal_at("after_cursor_execute", lambda statement, parameters, seen:
               statement.startswith("INSERT INTO TRIAL_INTERMEDIATE_VALUES"))


def _interrupted_and_re_queued(workdir) -> None:
    """The study's two trials: the first failed as interrupted, its WAITING copy with its parameters."""
    (first, again) = trials(workdir, "mine")
    assert first.state == TrialState.FAIL and first.user_attrs.get("fmnist.interrupted") == first.number, (
        first.user_attrs)
    assert again.state == TrialState.WAITING and again.params == first.params


def test_a_stop_as_a_finished_run_returns_ends_that_run_killed(tiny_overrides, workdir, tmp_path):
    """A trial whose run had finished when the stop came is re-queued (Optuna never got its
    result), so its run ends KILLED as interrupted, not FINISHED beside a failed trial."""
    _stopped_cleanly(_stop_as_a_run_returns, [f"sweep={lr_sweep(tmp_path, 2)}", *tiny_overrides], workdir,
                     tmp_path)
    first = trials(workdir, "mine")[0]
    assert first.state == TrialState.FAIL and first.user_attrs.get("fmnist.interrupted") == first.number
    (run,) = [r for r in mlflow_runs(workdir, "mine")[1] if "optuna.trial_number" in r.data.tags]
    assert run.info.status == "KILLED" and run.data.tags["fmnist.failure"].startswith("interrupted (SIGTERM)")


def _stop_beside_a_thread_that_never_ends() -> None:
    """A non-daemon thread that nothing ends (as Optuna's heartbeat thread is when a stop lands
    as it starts), then SIGTERM at the first epoch's report."""
    import threading

    threading.Thread(target=threading.Event().wait).start()
    _stop_at_the_first_report()


def test_a_stop_exits_though_a_library_thread_would_never_end(tiny_overrides, workdir, tmp_path):
    _stopped_cleanly(_stop_beside_a_thread_that_never_ends,
                     [f"sweep={lr_sweep(tmp_path, 2)}", *tiny_overrides, "trainer.epochs=3"], workdir, tmp_path)


def test_a_stop_as_optunas_ask_creates_a_trial_re_queues_that_trial(tiny_overrides, workdir, tmp_path):
    """A stop that lands inside Optuna's ask, once the new trial is in the storage, waits for ask
    to hand the trial out: the trial is failed as interrupted and re-queued, none left RUNNING."""
    _stopped_cleanly(_stop_as_a_trial_is_created, [f"sweep={lr_sweep(tmp_path, 2)}", *tiny_overrides],
                     workdir, tmp_path)
    _interrupted_and_re_queued(workdir)
    assert not [r for r in mlflow_runs(workdir, "mine")[1] if "optuna.trial_number" in r.data.tags]


def _stop_as_the_objective_is_called() -> None:
    """SIGTERM as Optuna calls the objective with the first trial: raised inside Optuna's own
    try block, before the objective's (the signal is taken at the call's first instruction)."""
    from fmnist_sweep.objective import Objective

    _sigterm_around(Objective, "__call__", after=False)


def test_a_stop_as_the_objective_is_called_marks_the_trial_interrupted(tiny_overrides, workdir, tmp_path):
    """A stop between Optuna's ask and the objective's first line is the objective's: the trial
    is failed as interrupted (not as a failure) and re-queued."""
    _stopped_cleanly(_stop_as_the_objective_is_called, [f"sweep={lr_sweep(tmp_path, 2)}", *tiny_overrides],
                     workdir, tmp_path)
    _interrupted_and_re_queued(workdir)


def _stop_whose_record_fails() -> None:
    """SIGTERM at the first epoch's report, and the store refusing the stopped run's KILLED end
    once: an error raised as the stop unwinds, with the stop behind it."""
    from fmnist_sweep.tracking import Tracker

    end, refused = Tracker.end, []

    def end_once_refused(self, run_id, status):
        if status == "KILLED" and not refused:
            refused.append(run_id)
            raise RuntimeError("the tracking store refused the write")
        return end(self, run_id, status)

    Tracker.end = end_once_refused
    _stop_at_the_first_report()


def test_an_error_raised_as_a_stop_unwinds_still_marks_the_trial_interrupted(tiny_overrides, workdir, tmp_path):
    """A stopped trial whose clean-up meets another error (its run's record refused) is still the
    stop's: failed as interrupted and re-queued, not counted as a failure."""
    _stopped_cleanly(_stop_whose_record_fails, [f"sweep={lr_sweep(tmp_path, 2)}", *tiny_overrides, "trainer.epochs=3"],
                     workdir, tmp_path)
    _interrupted_and_re_queued(workdir)


def _stop_in_a_read_inside_a_write() -> None:
    """SIGTERM as Optuna has read the first trial to write the objective's first attribute: the
    row not yet fetched, inside the write's SQLite transaction (its write lock taken)."""
    import threading
    import traceback

    def lands(statement, parameters, seen):  # (frames walked, not formatted: no source read per statement)
        return (statement.startswith("SELECT") and threading.current_thread() is threading.main_thread()
                and any(f.f_code.co_name == "set_trial_user_attr" for f, _ in traceback.walk_stack(None)))

    _signal_at("after_cursor_execute", lands)


def test_a_stop_inside_a_read_leaves_no_write_lock_behind(tiny_overrides, workdir, tmp_path):
    """The stopped process's own closing writes (the trial marked interrupted) do not wait on the
    write lock of the transaction the stop cut: a clean stop, not a busy timeout."""
    _stopped_cleanly(_stop_in_a_read_inside_a_write, [f"sweep={lr_sweep(tmp_path, 2)}", *tiny_overrides],
                     workdir, tmp_path)
    _interrupted_and_re_queued(workdir)


def test_a_stop_while_another_thread_writes_stops_the_main_thread():
    from fmnist_sweep import forks

    proc = forks.context().Process(target=_signalled_while_another_thread_writes)
    proc.start()
    proc.join(60)
    assert proc.exitcode == 143
