"""Shared fixtures: tiny IDX files written by the tests, and the real config shrunk."""

import os
import shutil
from pathlib import Path

import pytest


def _own_cores() -> None:
    """Each of the suite's processes (pytest -n N) runs on a share of the cores of its own, and
    so does every process its tests start: a command's default threads (trainer.threads=auto,
    one 1-thread worker per core) are then those of its share, as for workers side by side on
    one machine, instead of oversubscribing the cores another test process is using. (Before
    torch is imported: its thread pool is sized by the cores the process may run on.)"""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if worker and count > 1 and hasattr(os, "sched_setaffinity"):
        cores = sorted(os.sched_getaffinity(0))
        if len(cores) >= count:
            os.sched_setaffinity(0, cores[int(worker.removeprefix("gw")) % count::count])


_own_cores()

from tests.helpers import TINY, enter_workdir, free_port, wait_http, write_idx  # noqa: E402


def pytest_collection_modifyitems(items):
    """Tests marked ``first`` start first: the suite's longest waits (a budget that runs out by
    design), so that the other tests run beside them instead of after them."""
    items.sort(key=lambda item: item.get_closest_marker("first") is None)  # (a stable sort)


@pytest.fixture
def tiny_data(tmp_path) -> Path:
    folder = tmp_path / "tiny-fmnist"
    write_idx(folder)
    return folder


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """A fresh current directory, cache and tracking store for a test."""
    wd = tmp_path / "work"
    wd.mkdir()
    enter_workdir(monkeypatch, wd, tmp_path / "cache")
    return wd


@pytest.fixture(scope="session")
def migrated_mlflow_db(tmp_path_factory) -> Path:
    """An empty MLflow SQLite store with its schema in place. Creating one runs MLflow's
    ~50 schema migrations (~1.4 s); tests that run studies start from a copy of this one.
    The CLI's own creation of a fresh store is still exercised: by the tests on a bare
    ``workdir`` (tests/test_real_data.py) and the benchmarks' --quick runs, each in its own
    $FMNIST_SWEEP_DIR (tests/test_bench.py)."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlruns.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def tiny_overrides(tiny_data, workdir, migrated_mlflow_db) -> list[str]:
    """Overrides that shrink the real config to seconds on the tiny files (and the work
    directory's MLflow store, empty, copied from an already migrated one)."""
    shutil.copyfile(migrated_mlflow_db, workdir / "mlruns.db")
    return [f"data.root={tiny_data}", *TINY]



# --- PostgreSQL and a real `mlflow server` (the distributed path) -----------------------------
PG_ENV = "FMNIST_TEST_PG_URL"  # set by .ci/run; where it is set these tests must run


def _pg_admin():
    url = os.environ.get(PG_ENV)
    if not url:
        pytest.skip(f"${PG_ENV} is not set (CI sets it): no PostgreSQL for the distributed tests")
    from sqlalchemy.engine import make_url

    return make_url(url)


@pytest.fixture
def pg_database():
    """A fresh PostgreSQL database for one test (dropped after); yields its SQLAlchemy URL."""
    yield from _database()


def _database():
    import uuid

    import psycopg2

    admin = _pg_admin()
    name = f"fmnist_test_{uuid.uuid4().hex[:10]}"
    conn = psycopg2.connect(host=admin.host, port=admin.port or 5432, user=admin.username,
                            password=admin.password, dbname=admin.database or "postgres")
    conn.autocommit = True
    conn.cursor().execute(f"CREATE DATABASE {name}")
    try:
        yield admin.set(drivername="postgresql+psycopg2", database=name).render_as_string(hide_password=False)
    finally:
        conn.cursor().execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        conn.close()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on a free loopback port, PostgreSQL backend, served artifacts."""
    import subprocess
    import sys

    gen = _database()
    backend = next(gen)
    port = free_port()
    artifacts = tmp_path_factory.mktemp("mlflow-artifacts")
    log = open(tmp_path_factory.mktemp("mlflow-log") / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend,
         "--artifacts-destination", str(artifacts), "--serve-artifacts", "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, stdout=log, stderr=subprocess.STDOUT)
    uri = f"http://127.0.0.1:{port}"
    wait_http(uri + "/health", proc, what=f"mlflow server (log: {log.name})")
    yield uri
    proc.terminate()
    proc.wait(30)
    try:
        next(gen)
    except StopIteration:
        pass
