"""Many workers on one study: real PostgreSQL (Optuna storage) and a real `mlflow server`."""

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import optuna
import pytest
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from fmnist_sweep import train as fmnist_train
from fmnist_sweep.config import resource_dir

COUNTED = (TrialState.COMPLETE, TrialState.PRUNED)


def _sweep_file(path, n_trials: int):
    """A sweep over the learning rate alone, random sampler: the workers' tests' study."""
    path.write_text(textwrap.dedent(f"""
        objective: val/accuracy
        n_trials: {n_trials}
        sampler: {{name: random, seed: 0}}
        params:
          optimizer.lr: tag(log, interval(1e-4, 1e-2))
    """))
    return path


@pytest.fixture
def dist(tiny_overrides, workdir, pg_database, mlflow_server, tmp_path):
    """Command and environment of a worker: storage=postgres tracking=server, URLs from env."""
    name = f"dist{os.getpid()}{int(time.time() * 1000) % 10**8}"
    sweep = _sweep_file(tmp_path / f"{name}.yaml", 24)
    env = dict(os.environ, FMNIST_STORAGE_URL=pg_database, MLFLOW_TRACKING_URI=mlflow_server,
               PYTHONPATH=str(resource_dir("conf").parent))
    args = [f"sweep={sweep}", "storage=postgres", "tracking=server", *tiny_overrides]

    class Dist:
        pass

    d = Dist()
    d.name, d.env, d.args, d.url, d.uri, d.cwd = name, env, args, pg_database, mlflow_server, workdir
    d.cmd = [sys.executable, "-m", "fmnist_sweep"]
    d.trials = lambda: optuna.load_study(study_name=name, storage=pg_database).trials
    return d


def mlflow_view(d):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(d.uri)
    exps = [e for e in client.search_experiments() if e.name == d.name]
    runs = client.search_runs([e.experiment_id for e in exps]) if exps else []
    return client, exps, runs


def check_exact(d, n):
    ts = d.trials()
    counted = [t for t in ts if t.state in COUNTED]
    assert len(counted) == n
    client, exps, runs = mlflow_view(d)
    assert len(exps) == 1
    parents = [r for r in runs if r.data.tags.get("fmnist.role") == "study"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    assert len(parents) == 1
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in children)
    assert not [r for r in runs if r.info.status == "RUNNING"]
    assert finished_runs(children) == sorted(t.number for t in counted)  # one run per trial, none twice
    return ts, children


def finished_runs(runs) -> list[int]:
    """Trial numbers of the MLflow runs that say their trial counted (COMPLETE or PRUNED)."""
    return sorted(int(r.data.tags["optuna.trial_number"]) for r in runs
                  if r.data.tags.get("optuna.state") in ("COMPLETE", "PRUNED"))


def _enqueue_a_duplicate(pg_database):
    """Study "cut" whose trial 1 repeats trial 0's parameters: it is a duplicate."""
    study = optuna.create_study(study_name="cut", storage=pg_database, direction="maximize")
    for _ in range(2):
        study.enqueue_trial({"optimizer.lr": 1e-3})


def test_four_workers_finish_exactly_the_budget(dist):
    proc = subprocess.run([*dist.cmd, "workers", "-n", "4", *dist.args, "study.n_trials=12"], cwd=dist.cwd, env=dist.env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[w3]" in proc.stdout and "worker exit codes [0, 0, 0, 0]" in proc.stdout
    ts, children = check_exact(dist, 12)
    assert len({t.user_attrs["worker"] for t in ts if t.state in COUNTED}) >= 2  # shared by workers
    # each worker draws its own points: one seed in every worker drew the same ones in lockstep
    assert len({t.params["optimizer.lr"] for t in ts if t.state in COUNTED}) == 12
    assert all(t.user_attrs["host"] and t.user_attrs["device"] == "cpu" for t in ts)
    assert all(r.data.tags["fmnist.host"] for r in children)


def test_killed_worker_loses_nothing(dist):
    args = [*dist.args, "study.n_trials=6", "trainer.epochs=4", "storage.heartbeat_interval=1",
            "storage.grace_period=3"]
    victim = subprocess.Popen([*dist.cmd, *args], cwd=dist.cwd, env=dist.env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    running = []
    while time.time() < deadline and not running:
        try:
            # mid-trial: its parameters suggested (a kill before that leaves nothing to retry)
            running = [t for t in dist.trials() if t.state == TrialState.RUNNING and t.params
                       and t.user_attrs.get("worker", "").endswith(f":{victim.pid}")]
        except KeyError:
            pass
        time.sleep(0.2)
    assert running, "the victim never started a trial"
    victim.send_signal(signal.SIGKILL)
    victim.wait(10)
    survivor = subprocess.run([*dist.cmd, *args], cwd=dist.cwd, env=dist.env, capture_output=True,
                              text=True, timeout=600)
    assert survivor.returncode == 0, survivor.stdout[-3000:] + survivor.stderr[-3000:]
    ts, _ = check_exact(dist, 6)
    killed = next(t for t in ts if t.number == running[0].number)
    assert killed.state == TrialState.FAIL
    retried = [t for t in ts if RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == killed.number]
    assert len(retried) == 1 and retried[0].state in COUNTED and retried[0].params == killed.params


def test_workers_recover_when_database_connections_are_cut(dist):
    import psycopg2
    from sqlalchemy.engine import make_url

    url = make_url(dist.url)
    procs = [subprocess.Popen([*dist.cmd, *dist.args, "study.n_trials=12"], cwd=dist.cwd, env=dist.env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [[], []]
    for p, out in zip(procs, outputs):
        threading.Thread(target=lambda p=p, out=out: out.extend(p.stdout), daemon=True).start()
    admin = psycopg2.connect(host=url.host, port=url.port or 5432, user=url.username, dbname="postgres")
    admin.autocommit = True
    cut = 0
    deadline = time.time() + 120
    while time.time() < deadline and cut < 3:
        try:
            n = sum(t.state == TrialState.COMPLETE for t in dist.trials())
        except KeyError:
            n = 0
        if n >= 2 * (cut + 1):  # cut every worker connection, three times over the study
            admin.cursor().execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                   "WHERE datname = %s AND pid <> pg_backend_pid()", (url.database,))
            cut += 1
        time.sleep(0.1)
    codes = [p.wait(600) for p in procs]
    admin.close()
    assert cut == 3
    assert codes == [0, 0], "".join(outputs[0][-30:] + outputs[1][-30:])
    try:
        check_exact(dist, 12)
    except AssertionError:
        print("".join(outputs[0]) + "\n=====\n" + "".join(outputs[1]))
        for t in dist.trials():
            print(t.number, t.state.name, t.user_attrs, t.system_attrs)
        for r in mlflow_view(dist)[2]:
            print(r.info.run_id, r.info.status, {k: v for k, v in r.data.tags.items() if not k.startswith("mlflow.")})
        raise


def test_two_workers_starting_together_share_one_experiment_and_parent(dist):
    args = [*dist.args, "study.n_trials=2"]
    procs = [subprocess.Popen([*dist.cmd, *args], cwd=dist.cwd, env=dist.env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    check_exact(dist, 2)


def test_unreachable_postgres_is_one_clear_error(tiny_overrides, workdir, capsys, monkeypatch):
    from fmnist_sweep.cli import main

    monkeypatch.setenv("FMNIST_STORAGE_URL", "postgresql+psycopg2://nobody@127.0.0.1:1/none")
    assert main(["+experiment=quickstart", "storage=postgres", *tiny_overrides]) == 2
    err = capsys.readouterr().err
    assert "cannot open the Optuna storage 127.0.0.1:1/none" in err and "FMNIST_STORAGE_URL" in err


def test_a_trial_left_without_heartbeat_does_not_hang_the_study(dist):
    """A worker that loses the database between creating a trial and its first heartbeat
    leaves a RUNNING trial Optuna's heartbeat check never sees (seen when connections were
    cut: both workers then waited for it for ever). Made here exactly: a trial created
    through Optuna's storage API and never run. The study still ends, with its budget."""
    first = subprocess.run([*dist.cmd, *dist.args, "study.n_trials=1"], cwd=dist.cwd, env=dist.env,
                           capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    storage = optuna.storages.RDBStorage(dist.url)
    study = optuna.load_study(study_name=dist.name, storage=storage)
    orphan = storage.get_trial(storage.create_new_trial(study._study_id))
    t0 = time.time()
    args = [*dist.args, "study.n_trials=2", "storage.heartbeat_interval=1", "storage.grace_period=2"]
    proc = subprocess.run([*dist.cmd, *args], cwd=dist.cwd, env=dist.env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert time.time() - t0 < 100
    ts, _ = check_exact(dist, 2)
    assert next(t for t in ts if t.number == orphan.number).state == TrialState.FAIL


def _db_error(text="server closed the connection unexpectedly"):
    """What SQLAlchemy raises when PostgreSQL's connection is cut (or refused: ``text``)."""
    import sqlalchemy.exc

    return sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception(text))


def _cut_first_calls(monkeypatch, owner, name, then=None, times=1, text="server closed the connection unexpectedly"):
    """``owner.name`` raises what a cut PostgreSQL connection raises, on its first ``times`` calls."""
    real, calls = getattr(owner, name), []

    def cut(*args, **kwargs):
        calls.append(args)
        if len(calls) <= times:
            raise _db_error(text)
        if then is not None:
            then()
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, cut)
    return calls


@pytest.fixture
def pg_study(tiny_overrides, workdir, pg_database, tmp_path, monkeypatch):
    """One in-process worker on PostgreSQL (PostgreSQL's default heartbeat and grace period)."""
    from fmnist_sweep.cli import main

    sweep = _sweep_file(tmp_path / "cut.yaml", 3)
    monkeypatch.setenv("FMNIST_STORAGE_URL", pg_database)

    def run(*extra):
        t0 = time.time()
        code = main([f"sweep={sweep}", "storage=postgres", "study.name=cut", *tiny_overrides, *extra])
        trials = optuna.load_study(study_name="cut", storage=pg_database).trials
        return code, trials, time.time() - t0

    return run


@pytest.mark.parametrize("where", ["ask", "ask-waiting", "report"])
def test_a_trial_cut_from_its_database_is_failed_and_requeued_at_once(where, pg_study, pg_database, monkeypatch,
                                                                        capsys):
    """A cut inside ``study.ask`` (the trial created, or taken from the waiting queue, and
    no heartbeat yet) or inside training (the epoch's report): the worker reconnects,
    fails the trial it held at once and re-queues it with its parameters. Before, the
    first stayed RUNNING until two grace periods passed (2 minutes with PostgreSQL's
    defaults) and the second was a FAIL counted against max_failures, its parameters
    never tried again."""
    if where == "ask-waiting":  # the study's first trial is an enqueued one
        optuna.create_study(study_name="cut", storage=pg_database, direction="maximize").enqueue_trial(
            {"optimizer.lr": 1e-3})
    if where.startswith("ask"):
        _cut_first_calls(monkeypatch, optuna.samplers.RandomSampler, "before_trial")
    else:
        _cut_first_calls(monkeypatch, optuna.trial.Trial, "report")
    code, trials, seconds = pg_study()
    out = capsys.readouterr().out
    assert code == 0, out
    assert "storage connection lost ((builtins.Exception) server closed the connection unexpectedly)" in out
    assert seconds < 60, "the study waited for a grace period"
    counted = [t for t in trials if t.state in COUNTED]
    cut = trials[0]
    assert len(counted) == 3 and cut.state == TrialState.FAIL and "failure" not in cut.user_attrs
    retried = [t for t in trials if RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == cut.number]
    assert len(retried) == 1 and retried[0].state in COUNTED
    if where == "report":  # same parameters; its MLflow run says why it stopped, and is not a finished trial's
        assert retried[0].params == cut.params and cut.params
        from tests.conftest import mlflow_runs

        _, runs = mlflow_runs(Path.cwd(), "cut")
        run = next(r for r in runs if r.data.tags.get("optuna.trial_number") == str(cut.number))
        assert run.info.status == "KILLED" and "optuna.state" not in run.data.tags
        assert "storage connection was lost" in run.data.tags["fmnist.failure"]


@pytest.mark.parametrize("where", ["trained", "duplicate"])
def test_a_cut_while_storing_a_trials_run_leaves_no_run_saying_complete(where, pg_study, pg_database,
                                                                          monkeypatch, capsys):
    """The cut lands after the trial's MLflow run exists, as the worker stores the run's id
    in the trial (a trained trial; a duplicate, whose run takes its twin's result). Before,
    the trial was failed, never re-queued, and its run still said COMPLETE: the study's
    MLflow view showed a finished run for a trial Optuna did not count (seen once in CI
    with two workers and real cuts, where the seed-0 random samplers of the two workers
    make duplicates)."""
    from tests.conftest import mlflow_runs

    _enqueue_a_duplicate(pg_database)
    real, cuts = optuna.trial.Trial.set_user_attr, []

    def cut_once(trial, key, value):
        if key == "mlflow_run_id" and trial.number == (0 if where == "trained" else 1) and not cuts:
            cuts.append(trial.number)
            raise _db_error()
        return real(trial, key, value)

    monkeypatch.setattr(optuna.trial.Trial, "set_user_attr", cut_once)
    code, trials, _ = pg_study()
    out = capsys.readouterr().out
    assert code == 0, out
    assert cuts and "storage connection lost" in out
    cut = next(t for t in trials if t.number == cuts[0])
    retried = [t for t in trials if RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == cut.number]
    assert cut.state == TrialState.FAIL and len(retried) == 1
    assert retried[0].state in COUNTED and retried[0].params == cut.params
    counted = sorted(t.number for t in trials if t.state in COUNTED)
    assert len(counted) == 3
    _, runs = mlflow_runs(Path.cwd(), "cut")
    assert finished_runs(runs) == counted
    run = next(r for r in runs if r.data.tags.get("optuna.trial_number") == str(cut.number))
    assert run.data.tags["optuna.state"] == "FAIL"
    assert "storage connection was lost" in run.data.tags["fmnist.failure"]


def test_a_worker_holds_the_trials_it_runs_not_those_it_requeues(tmp_path):
    """The trial a worker fails and re-queues after a cut is the one it holds: one it
    created running or took from the queue. A trial it re-queues for any worker (the
    heartbeat check's retry, an enqueue) is not: held, a later cut would have made this
    worker fail it while another worker ran it."""
    from fmnist_sweep.study import WorkerStorage

    storage = WorkerStorage(f"sqlite:///{tmp_path / 'held.db'}")
    study = optuna.create_study(storage=storage)
    study.enqueue_trial({"x": 1.0})
    assert storage.held is None
    taken = study.ask()  # from the queue
    assert storage.held == taken._trial_id
    study.tell(taken, 1.0)
    created = study.ask()  # a new one
    assert storage.held == created._trial_id
    study.enqueue_trial({"x": 2.0})
    assert storage.held == created._trial_id


def test_a_heartbeat_cut_from_the_database_keeps_beating(pg_study, monkeypatch, capsys):
    """Optuna's heartbeat thread ended at its first failed beat: a trial that outlived the
    grace period after a cut was failed under its running worker by the others' checks.
    Here the trial's first beat is cut; it starts training only once a later beat got
    through (or after 15 s without one: the test then fails)."""
    resumed = threading.Event()
    calls = _cut_first_calls(monkeypatch, optuna.storages.RDBStorage, "record_heartbeat", then=resumed.set)
    real_run = fmnist_train.run

    def run_after_a_beat(*args, **kwargs):
        resumed.wait(15)
        return real_run(*args, **kwargs)

    monkeypatch.setattr(fmnist_train, "run", run_after_a_beat)
    code, trials, _ = pg_study("storage.heartbeat_interval=1", "study.n_trials=1")
    assert code == 0, capsys.readouterr().out
    assert resumed.is_set() and len(calls) >= 2
    assert [t.state for t in trials] == [TrialState.COMPLETE]


@pytest.mark.parametrize("where", ["training", "duplicate"])
def test_a_trial_another_worker_took_over_does_not_stop_this_worker(where, pg_study, pg_database, monkeypatch,
                                                                    capsys):
    """A worker whose heartbeats did not reach the storage for the grace period (a long cut,
    a stalled machine) has its running trial failed and re-queued by another worker's check.
    When it next reaches the storage — in training, or storing a duplicate's run — it
    abandons that trial and goes on; before, Optuna's tell raised "Cannot tell a FAIL
    trial" out of the study and the worker died (still so for a duplicate, whose run also
    said COMPLETE)."""
    from tests.conftest import mlflow_runs

    storage = optuna.storages.RDBStorage(pg_database)
    victim = 0 if where == "training" else 1

    def take_over(trial):
        if trial.number == victim and not storage.get_trial(trial._trial_id).state.is_finished():
            storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)  # another worker's check
            RetryHeartbeatStaleTrialCallback(max_retry=2)(trial.study, storage.get_trial(trial._trial_id))

    if where == "training":
        real_report = optuna.trial.Trial.report

        def report(trial, value, step):
            take_over(trial)
            return real_report(trial, value, step)

        monkeypatch.setattr(optuna.trial.Trial, "report", report)
    else:
        _enqueue_a_duplicate(pg_database)
        real_set = optuna.trial.Trial.set_user_attr

        def set_user_attr(trial, key, value):
            if key == "mlflow_run_id":
                take_over(trial)
            return real_set(trial, key, value)

        monkeypatch.setattr(optuna.trial.Trial, "set_user_attr", set_user_attr)
    code, trials, _ = pg_study()
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"trial {victim}: failed and re-queued by another worker's heartbeat check while it ran here" in out
    counted = sorted(t.number for t in trials if t.state in COUNTED)
    assert len(counted) == 3 and trials[victim].state == TrialState.FAIL
    retried = [t for t in trials if RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == victim]
    assert len(retried) == 1 and retried[0].params == trials[victim].params  # re-queued once, not twice
    _, runs = mlflow_runs(Path.cwd(), "cut")
    assert finished_runs(runs) == counted


def test_a_worker_waits_for_a_restarting_database(pg_study, monkeypatch, capsys):
    """The storage refuses twice in a row, before any trial (a server restarting): the worker
    waits (2 s, then 4 s) and goes on. Before, the heartbeat check at the top of its loop
    ran outside the reconnect handling, and the first refusal ended the worker."""
    _cut_first_calls(monkeypatch, optuna.storages.RDBStorage, "_get_stale_trial_ids", times=2,
              text="the database system is starting up")
    code, trials, _ = pg_study()
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.count("storage connection lost ((builtins.Exception) the database system is starting up)") == 2
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3


class _Proxy:
    """A TCP relay to PostgreSQL that can go down and come back (a database restart, as a
    worker sees it): down() drops every relayed connection and turns new ones away."""

    def __init__(self, host: str, port: int):
        import socket

        self.target, self.up, self.pairs, self.done = (host, port), threading.Event(), [], threading.Event()
        self.lock = threading.Lock()  # a connection accepted while down() runs is dropped too
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.up.set()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        import socket

        while not self.done.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:  # closed
                return
            server = socket.create_connection(self.target)
            with self.lock:
                if not self.up.is_set():  # what a restarting server does to a new connection
                    _drop(client, server)
                    continue
                self.pairs.append((client, server))
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src, dst):
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        _drop(src, dst)

    def down(self):
        with self.lock:
            self.up.clear()
            for pair in self.pairs:
                _drop(*pair)
            self.pairs.clear()

    def close(self):
        self.done.set()
        self.down()
        self.listener.close()


def _drop(*sockets):
    """Close TCP connections as a dying server does: shutdown() sends the FIN and wakes a
    thread blocked in recv() on them (close() alone does neither while one is: the worker
    then waited for ever on a connection that was neither answered nor closed)."""
    import socket

    for s in sockets:
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        s.close()


def test_a_worker_rides_out_a_database_restart(pg_study, pg_database, monkeypatch, capsys):
    """The database goes away for 5 s in the middle of a study — every connection dropped,
    new ones turned away — and comes back: the worker reconnects and finishes the budget
    exactly, without a second copy of any trial's result."""
    from sqlalchemy.engine import make_url

    url = make_url(pg_database)
    proxy = _Proxy(url.host or "127.0.0.1", url.port or 5432)
    monkeypatch.setenv("FMNIST_STORAGE_URL", url.set(port=proxy.port).render_as_string(hide_password=False))
    outage = {}

    def restart():
        deadline = time.time() + 120
        while time.time() < deadline and "start" not in outage:
            try:
                if sum(t.state == TrialState.COMPLETE for t in optuna.load_study(
                        study_name="cut", storage=pg_database).trials) >= 2:
                    outage["start"] = time.time()
                    proxy.down()
                    time.sleep(5)
            except KeyError:  # the study is not made yet
                pass
            finally:
                proxy.up.set()
            time.sleep(0.1)

    watcher = threading.Thread(target=restart, daemon=True)
    watcher.start()
    try:
        code, trials, _ = pg_study("study.n_trials=6", "storage.heartbeat_interval=1")
    finally:
        watcher.join(130)
        proxy.close()
    out = capsys.readouterr().out
    assert "start" in outage, "the study ended before the outage"
    assert code == 0, out
    assert "storage connection lost" in out
    counted = [t for t in trials if t.state in COUNTED]
    assert len(counted) == 6
    from tests.conftest import mlflow_runs

    _, runs = mlflow_runs(Path.cwd(), "cut")
    finished = [int(r.data.tags["optuna.trial_number"]) for r in runs
                if r.data.tags.get("optuna.state") in ("COMPLETE", "PRUNED")]
    assert sorted(finished) == sorted(t.number for t in counted)  # one finished run per counted trial


def test_a_cut_during_optunas_tell_is_a_lost_connection_too(pg_study, monkeypatch, capsys):
    """Optuna's tell meets the cut, and so does its read of the trial after it: Optuna's own
    finally block then raises UnboundLocalError (the DB error only as its context). The
    worker must see the lost connection behind it (seen with a real outage, the proxy test
    above), not die."""
    import optuna.study._optimize as optimize_module

    real_tell, real_get = optimize_module._tell_with_warning, optuna.storages.RDBStorage.get_trial
    state = {"tell": 0, "read": False}

    def tell(*args, **kwargs):
        state["tell"] += 1
        if state["tell"] == 1:
            state["read"] = True  # the read right after fails too
            raise _db_error()
        return real_tell(*args, **kwargs)

    def get_trial(storage, trial_id):
        if state["read"]:
            state["read"] = False
            raise _db_error()
        return real_get(storage, trial_id)

    monkeypatch.setattr(optimize_module, "_tell_with_warning", tell)
    monkeypatch.setattr(optuna.storages.RDBStorage, "get_trial", get_trial)
    code, trials, _ = pg_study()
    out = capsys.readouterr().out
    assert code == 0, out
    assert "storage connection lost ((builtins.Exception) server closed the connection unexpectedly)" in out
    assert len([t for t in trials if t.state in COUNTED]) == 3
    assert trials[0].state == TrialState.FAIL  # its result never reached the study: trained again
    assert [t for t in trials if RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == 0]


def test_a_database_lost_after_the_last_trial_is_ridden_out_too(pg_study, monkeypatch, capsys):
    """The storage is cut right after the study's last trial, in its closing reads (orphan
    runs), again in its report, and again in the summary's read of the best trial: the
    worker reconnects each time and ends as usual. Before, those reads were outside the
    reconnect handling: a traceback, exit 1 (the last one seen with real cuts)."""
    from fmnist_sweep import study as study_module
    from fmnist_sweep import study_report

    real_end_orphans, cut = study_module.Study._end_orphans, []

    def end_orphans(study):
        if study.finished() >= study.target and not cut:  # the closing call, once
            cut.append(study.finished())
            raise _db_error()
        return real_end_orphans(study)

    monkeypatch.setattr(study_module.Study, "_end_orphans", end_orphans)
    _cut_first_calls(monkeypatch, study_report, "publish")
    published, real_publish, real_best = [], study_report.publish, study_module.Study.best_trials

    def publish(study):
        real_publish(study)
        published.append(study.name)

    def best_trials(study):
        if published and len(cut) == 1:  # the summary's read, after the report
            cut.append("best")
            raise _db_error()
        return real_best(study)

    monkeypatch.setattr(study_report, "publish", publish)
    monkeypatch.setattr(study_module.Study, "best_trials", best_trials)
    code, trials, _ = pg_study()
    captured = capsys.readouterr()
    assert code == 0, captured.out + captured.err
    assert cut == [3, "best"] and captured.out.count("storage connection lost") == 3
    assert "best trial " in captured.out
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    from tests.conftest import mlflow_runs

    _, runs = mlflow_runs(Path.cwd(), "cut")
    parent = next(r for r in runs if r.data.tags.get("fmnist.role") == "study")
    assert parent.info.status == "FINISHED" and parent.data.metrics["study/complete"] == 3


def test_a_database_that_stays_down_is_one_error_line(pg_study, monkeypatch, capsys):
    """Down for good: after six losses in a row (pauses skipped here) the worker stops with
    one error line, exit 2, and the report it cannot refresh does not replace that error."""
    from fmnist_sweep import study as study_module
    from fmnist_sweep import study_report

    for owner, name in ((optuna.storages.RDBStorage, "_get_stale_trial_ids"), (study_report, "publish")):
        _cut_first_calls(monkeypatch, owner, name, times=99, text="could not connect to server: Connection refused")
    monkeypatch.setattr(study_module.time, "sleep", lambda seconds: None)
    code, trials, _ = pg_study()
    captured = capsys.readouterr()
    assert code == 2, captured.out + captured.err
    assert captured.err.splitlines()[-1].startswith("error: lost the study storage")
    assert "6 times in a row: (builtins.Exception) could not connect to server" in captured.err
    assert "warning: the study report was not refreshed (OperationalError); later: python -m fmnist_sweep report cut" \
        in captured.err and "storage=postgres" in captured.err
    assert "Traceback" not in captured.out + captured.err and trials == []
