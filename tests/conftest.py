"""Shared fixtures: tiny IDX files written by the tests, and the real config shrunk."""

import gzip
import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from fmnist_sweep.data import FILES

REAL_DATA = Path(os.environ.get("FMNIST_REAL_DATA", "/usr/share/datasets/fashion-mnist"))


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx(folder: Path, n_train_per_class=20, n_test_per_class=6, seed=0) -> dict[str, str]:
    """Four gzipped IDX files of learnable fake images: each class is a bright
    horizontal band at its own height, plus noise. Returns their SHA-256 table."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    checksums = {}

    def images_for(labels):
        x = rng.integers(0, 60, size=(len(labels), 28, 28))
        for i, c in enumerate(labels):
            x[i, 2 + 2 * c: 5 + 2 * c, :] = 230
        return x

    arrays = {}
    for split, per_class in (("train", n_train_per_class), ("test", n_test_per_class)):
        labels = rng.permutation(np.repeat(np.arange(10), per_class))
        arrays[f"{split}_images"] = images_for(labels)
        arrays[f"{split}_labels"] = labels
    for key, (name, _) in FILES.items():
        raw = idx_bytes(arrays[key])
        (folder / name).write_bytes(gzip.compress(raw))
        checksums[name] = hashlib.sha256(raw).hexdigest()
    return checksums


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
    monkeypatch.chdir(wd)
    monkeypatch.setenv("FMNIST_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("FMNIST_DATA_DIR", raising=False)
    monkeypatch.delenv("FMNIST_SWEEP_DIR", raising=False)
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
    return [f"data.root={tiny_data}", "data.verify=false", "data.download=false",
            "data.val_fraction=0.2", "trainer.epochs=1", "trainer.batch_size=32",
            "trainer.threads=1"]


def mlflow_runs(workdir: Path, experiment="fmnist-sweep"):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlruns.db'}")
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, "no MLflow experiment was created"
    return client, client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])


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


def wait_http(url: str, proc, seconds: float = 120, what: str = "server") -> None:
    """Until ``url`` answers, or fail if ``proc`` exits or time runs out."""
    import time
    import urllib.request

    deadline = time.time() + seconds
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise AssertionError(f"{what} did not answer at {url}")
            time.sleep(0.5)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
