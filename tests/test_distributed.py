"""Many workers on one study, and the faults they meet, as a user sees them: real
PostgreSQL (Optuna storage), a real `mlflow server`, killed processes and cut connections.
Each test asserts exit codes, the study's trial states and the MLflow runs; none patches
Optuna or MLflow."""

import os
import signal
import threading
import time
from pathlib import Path

import optuna
import pytest
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from tests.helpers import Forked, lr_sweep, mlflow_runs, run_cli

COUNTED = (TrialState.COMPLETE, TrialState.PRUNED)


@pytest.fixture
def dist(tiny_overrides, workdir, pg_database, mlflow_server, tmp_path):
    """Command and environment of a worker: storage=postgres tracking=server, URLs from env."""
    name = f"dist{os.getpid()}{int(time.time() * 1000) % 10**8}"
    sweep = lr_sweep(tmp_path, 24, name)
    env = dict(os.environ, FMNIST_STORAGE_URL=pg_database, MLFLOW_TRACKING_URI=mlflow_server)
    args = [f"sweep={sweep}", "storage=postgres", "tracking=server", *tiny_overrides]

    class Dist:
        pass

    d = Dist()
    d.name, d.env, d.args, d.url, d.uri, d.cwd = name, env, args, pg_database, mlflow_server, workdir
    # one pool for the test's many reads, riding out the connection cuts some tests make
    storage = optuna.storages.RDBStorage(pg_database, engine_kwargs={"pool_pre_ping": True})
    d.trials = lambda: optuna.load_study(study_name=name, storage=storage).trials
    return d


def mlflow_view(d):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(d.uri)
    exps = [e for e in client.search_experiments() if e.name == d.name]
    runs = client.search_runs([e.experiment_id for e in exps]) if exps else []
    return client, exps, runs


def check_record(d, n, workers=1):
    """What a user reads after the study: its budget met (up to workers - 1 trials more,
    those running when it was met), nothing left RUNNING, one experiment with one parent
    run, and exactly one child run saying COMPLETE/PRUNED per counted trial."""
    ts = d.trials()
    counted = [t for t in ts if t.state in COUNTED]
    assert n <= len(counted) <= n + workers - 1
    assert not [t for t in ts if t.state == TrialState.RUNNING]
    client, exps, runs = mlflow_view(d)
    assert len(exps) == 1
    parents = [r for r in runs if r.data.tags.get("fmnist.role") == "study"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    assert len(parents) == 1
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in children)
    assert not [r for r in runs if r.info.status == "RUNNING"]
    assert finished_runs(children) == sorted(t.number for t in counted)  # one run per trial, none twice
    for t in counted:
        (run,) = [r for r in children if r.info.run_id == t.user_attrs["mlflow_run_id"]]
        assert run.data.tags["optuna.state"] == t.state.name
    return ts, children


def finished_runs(runs) -> list[int]:
    """Trial numbers of the MLflow runs that say their trial counted (COMPLETE or PRUNED)."""
    return sorted(int(r.data.tags["optuna.trial_number"]) for r in runs
                  if r.data.tags.get("optuna.state") in ("COMPLETE", "PRUNED"))


def test_four_workers_share_the_budget(dist):
    proc = run_cli(["workers", "-n", "4", *dist.args, "study.n_trials=8"], dist.cwd, dist.env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[w3]" in proc.stdout and "worker exit codes [0, 0, 0, 0]" in proc.stdout
    ts, children = check_record(dist, 8, workers=4)
    assert len({t.user_attrs["worker"] for t in ts if t.state in COUNTED}) >= 2  # shared by workers
    # each worker draws its own points: one seed in every worker drew the same ones in lockstep
    counted = [t for t in ts if t.state in COUNTED]
    assert len({t.params["optimizer.lr"] for t in counted}) == len(counted)
    assert all(t.user_attrs["host"] and t.user_attrs["device"] == "cpu" for t in ts)
    assert all(r.data.tags["fmnist.host"] for r in children)


def test_killed_worker_loses_nothing(dist):
    args = [*dist.args, "study.n_trials=6", "trainer.epochs=4", "storage.heartbeat_interval=1",
            "storage.grace_period=3"]
    victim = Forked(args, dist.cwd, dist.env, merge=True)
    threading.Thread(target=victim.stdout.read, daemon=True).start()  # its output, unread
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
    survivor = run_cli(args, dist.cwd, dist.env)
    assert survivor.returncode == 0, survivor.stdout[-3000:] + survivor.stderr[-3000:]
    ts, _ = check_record(dist, 6)
    killed = next(t for t in ts if t.number == running[0].number)
    assert killed.state == TrialState.FAIL
    retried = [t for t in ts if RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == killed.number]
    assert len(retried) == 1 and retried[0].state in COUNTED and retried[0].params == killed.params


def test_workers_recover_when_database_connections_are_cut(dist):
    import psycopg2
    from sqlalchemy.engine import make_url

    url = make_url(dist.url)
    # A cut inside Optuna's ask leaves a trial with no owner, failed a grace period after it started.
    args = [*dist.args, "study.n_trials=12", "storage.heartbeat_interval=1", "storage.grace_period=10"]
    procs = [Forked(args, dist.cwd, dist.env, merge=True) for _ in range(2)]
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
        check_record(dist, 12, workers=2)
    except AssertionError:
        print("".join(outputs[0]) + "\n=====\n" + "".join(outputs[1]))
        for t in dist.trials():
            print(t.number, t.state.name, t.user_attrs, t.system_attrs)
        for r in mlflow_view(dist)[2]:
            print(r.info.run_id, r.info.status, {k: v for k, v in r.data.tags.items() if not k.startswith("mlflow.")})
        raise


def test_unreachable_postgres_is_one_clear_error(tiny_overrides, workdir, capsys, monkeypatch):
    from fmnist_sweep.cli import main

    monkeypatch.setenv("FMNIST_STORAGE_URL", "postgresql+psycopg2://nobody@127.0.0.1:1/none")
    assert main(["+experiment=quickstart", "storage=postgres", *tiny_overrides]) == 2
    err = capsys.readouterr().err
    assert "cannot open the Optuna storage 127.0.0.1:1/none" in err and "FMNIST_STORAGE_URL" in err


@pytest.fixture
def pg_study(tiny_overrides, workdir, pg_database, tmp_path, monkeypatch):
    """One in-process worker on PostgreSQL, through the CLI: (exit code, trials, seconds)."""
    from fmnist_sweep.cli import main

    sweep = lr_sweep(tmp_path, 3, "cut")
    monkeypatch.setenv("FMNIST_STORAGE_URL", pg_database)

    def run(*extra):
        t0 = time.time()
        code = main([f"sweep={sweep}", "storage=postgres", "study.name=cut", *tiny_overrides, *extra])
        trials = optuna.load_study(study_name="cut", storage=pg_database).trials
        return code, trials, time.time() - t0

    return run


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
    """The database goes away in the middle of a study (every connection dropped, new ones
    turned away) and stays away until the worker has met the outage (at least 5 s, so the
    heartbeat meets it too); it comes back and the worker reconnects and finishes its
    budget, with one finished run per counted trial."""
    from sqlalchemy.engine import make_url

    from fmnist_sweep.recovery import Recovery

    url = make_url(pg_database)
    proxy = _Proxy(url.host or "127.0.0.1", url.port or 5432)
    monkeypatch.setenv("FMNIST_STORAGE_URL", url.set(port=proxy.port).render_as_string(hide_password=False))
    met, pause = threading.Event(), Recovery.pause

    def meeting(self, e):  # observed at our own seam: the worker's main thread lost its storage
        met.set()
        return pause(self, e)

    monkeypatch.setattr(Recovery, "pause", meeting)
    outage, watching = {}, optuna.storages.RDBStorage(pg_database)  # one pool for the watcher's reads

    def restart():
        deadline = time.time() + 120
        while time.time() < deadline and "start" not in outage:
            try:
                if sum(t.state == TrialState.COMPLETE for t in optuna.load_study(
                        study_name="cut", storage=watching).trials) >= 2:
                    outage["start"] = time.time()
                    proxy.down()
                    time.sleep(5)
                    outage["met"] = met.wait(60)
            except KeyError:  # the study is not made yet
                pass
            finally:
                proxy.up.set()
            time.sleep(0.1)

    watcher = threading.Thread(target=restart, daemon=True)
    watcher.start()
    try:
        code, trials, _ = pg_study("study.n_trials=6", "storage.heartbeat_interval=1", "storage.retry_pause=1")
    finally:
        watcher.join(130)
        proxy.close()
    out = capsys.readouterr().out
    assert outage.get("met"), f"the study ended before it met the outage ({outage})"
    assert code == 0, out
    assert "storage connection lost" in out
    counted = [t for t in trials if t.state in COUNTED]
    assert len(counted) == 6 and not [t for t in trials if t.state == TrialState.RUNNING]
    _, runs = mlflow_runs(Path.cwd(), "cut")
    assert finished_runs(runs) == sorted(t.number for t in counted)


def test_a_database_that_stays_down_is_one_error_line(pg_study, pg_database, monkeypatch, capsys):
    """Down for good after the first trial: after six losses in a row the worker stops with
    one error line, exit 2, and no traceback; the next start retries the trial it left
    (its own if it reached the objective, else once it is a grace period old)."""
    from sqlalchemy.engine import make_url

    url = make_url(pg_database)
    proxy = _Proxy(url.host or "127.0.0.1", url.port or 5432)
    monkeypatch.setenv("FMNIST_STORAGE_URL", url.set(port=proxy.port).render_as_string(hide_password=False))

    watching = optuna.storages.RDBStorage(pg_database)

    def cut_for_good():
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if any(t.state == TrialState.COMPLETE for t in optuna.load_study(
                        study_name="cut", storage=watching).trials):
                    proxy.down()
                    return
            except KeyError:
                pass
            time.sleep(0.05)

    watcher = threading.Thread(target=cut_for_good, daemon=True)
    watcher.start()
    try:
        code, _, _ = pg_study("storage.retry_pause=0.1", "trainer.epochs=3")
    finally:
        watcher.join(130)
        proxy.close()
    captured = capsys.readouterr()
    assert code == 2, captured.out + captured.err
    assert captured.err.splitlines()[-1].startswith("error: lost the study storage")
    assert "6 times in a row" in captured.err
    assert "Traceback" not in captured.out + captured.err, captured.out + captured.err
    monkeypatch.setenv("FMNIST_STORAGE_URL", pg_database)
    time.sleep(2.5)  # a trial the cut left without an owner is failed after the grace period
    code, trials, _ = pg_study("storage.grace_period=2")
    assert code == 0 and len([t for t in trials if t.state in COUNTED]) == 3
    assert not [t for t in trials if t.state == TrialState.RUNNING]


@pytest.mark.parametrize("driver", ["postgresql", "postgresql+psycopg2"])
def test_plain_and_psycopg2_urls_both_work(driver, pg_study, pg_database, monkeypatch, capsys):
    """The URL every hosted PostgreSQL hands out (psycopg 3 to SQLAlchemy 2.1), and psycopg2's."""
    from sqlalchemy.engine import make_url

    monkeypatch.setenv("FMNIST_STORAGE_URL", make_url(pg_database).set(drivername=driver)
                       .render_as_string(hide_password=False))
    code, trials, _ = pg_study("study.n_trials=1")
    assert code == 0, capsys.readouterr()
    assert [t.state for t in trials] == [TrialState.COMPLETE]


@pytest.mark.parametrize("where", ["sqlite", "postgres"])
def test_three_workers_started_together_on_a_fresh_store(where, tiny_overrides, workdir, tmp_path, request):
    """The same command in three terminals at once, on fresh stores (the study's and MLflow's
    embedded SQLite): no process crashes, one experiment, one parent run."""
    (workdir / "mlruns.db").unlink()  # a fresh MLflow store, migrated by whichever process comes first
    env = dict(os.environ)
    args = [f"sweep={lr_sweep(tmp_path, 3)}", *tiny_overrides]
    if where == "postgres":
        env["FMNIST_STORAGE_URL"] = request.getfixturevalue("pg_database")
        args.append("storage=postgres")
    procs = [Forked(args, workdir, env, merge=True) for _ in range(3)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], "\n=====\n".join(outs)
    assert not any("Traceback" in o for o in outs)
    study = optuna.load_study(study_name="mine", storage=env.get("FMNIST_STORAGE_URL", f"sqlite:///{workdir / 'studies.db'}"))
    assert 3 <= len([t for t in study.trials if t.state in COUNTED]) <= 5
    client, runs = mlflow_runs(workdir, "mine")
    assert len([e for e in client.search_experiments() if e.name == "mine"]) == 1
    assert len([r for r in runs if r.data.tags.get("fmnist.role") == "study"]) == 1


def test_runs_that_log_the_same_datasets_at_once_all_record_them(mlflow_server):
    """Workers started together log the same data splits into a new experiment at the same
    moment (MLflow looks a dataset up, then inserts it: the second insert of a pair meets the
    first one's key): every run records its inputs, none fails."""
    import uuid

    import torch

    from fmnist_sweep.data import Split
    from fmnist_sweep.tracking import Tracker

    n, name = 8, f"datasets-{uuid.uuid4().hex[:8]}"
    trackers = [Tracker(mlflow_server, name) for _ in range(n)]
    splits = {"training": Split(torch.zeros(4, 1, 28, 28), torch.zeros(4, dtype=torch.int64), "0123456789abcdef")}
    runs = [t.start(f"run {i}", {}, {}) for i, t in enumerate(trackers)]
    together, errors = threading.Barrier(n), []

    def log(tracker, run_id):
        together.wait()
        try:
            tracker.log_datasets(run_id, splits, "/nowhere")
        except Exception as e:  # what a worker's trial would have failed with
            errors.append(e)

    threads = [threading.Thread(target=log, args=pair) for pair in zip(trackers, runs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[0]
    for run_id in runs:
        assert [d.dataset.name for d in trackers[0].client.get_run(run_id).inputs.dataset_inputs] == [
            "fashion-mnist-training"]
