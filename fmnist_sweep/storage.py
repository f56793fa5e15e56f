"""The Optuna storage a study lives in: SQLite (the embedded default), a journal file, or
PostgreSQL. Durability is Optuna's: heartbeats, and a retry callback that re-queues the
trial of a worker that stopped beating. What this module adds is how a worker opens it:
the first process creates a fresh store while the others wait for it."""

from __future__ import annotations

import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path

import optuna
import sqlalchemy
import sqlalchemy.exc
from omegaconf import DictConfig
from optuna.trial import TrialState

from .errors import UserError
from .tracking import first_creates, sqlite_wal, sync_at_checkpoints

warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeat and retry

# What a cut connection to the study storage raises (Optuna wraps some as StorageInternalError).
CONNECTION_ERRORS = (sqlalchemy.exc.DBAPIError, optuna.exceptions.StorageInternalError)


def connection_error(e: BaseException | None) -> BaseException | None:
    """The storage connection error behind ``e``, if any: ``e`` itself, its cause, or the
    error being handled when it was raised (Optuna's optimize can raise another error from
    its own clean-up when its tell meets the cut)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, CONNECTION_ERRORS):
            return e
        e = e.__cause__ or e.__context__
    return None


class WorkerStorage(optuna.storages.RDBStorage):
    """Optuna's RDB storage as one worker process uses it.

    ``held`` is the waiting trial (enqueued, or re-queued) this process last took: after a
    cut inside ``study.ask`` the worker knows which trial to fail and re-queue. A heartbeat that meets a cut connection is skipped rather than ending
    Optuna's heartbeat thread, so a trial that outlives an outage keeps beating."""

    held: int | None = None

    def set_trial_state_values(self, trial_id, state, values=None) -> bool:
        taken = super().set_trial_state_values(trial_id, state=state, values=values)
        if taken and state == TrialState.RUNNING:
            self.held = trial_id
        return taken

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            super().record_heartbeat(trial_id)
        except CONNECTION_ERRORS:
            pass


@contextmanager
def _pg_first_creates(url: str):
    """The same for a PostgreSQL database, with a session-level advisory lock."""
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT pg_advisory_lock(727274)")  # any key shared by the workers
            try:
                yield
            finally:
                conn.exec_driver_sql("SELECT pg_advisory_unlock(727274)")
    finally:
        engine.dispose()


def sqlite_path(url: str) -> Path | None:
    """The file of a ``sqlite:///`` URL, absolute; None for other URLs."""
    if url.startswith("sqlite:///"):
        return Path(url[len("sqlite:///"):]).expanduser().resolve()
    return None


def retry_callback(cfg_storage: DictConfig) -> optuna.storages.RetryHeartbeatStaleTrialCallback:
    """Optuna's retry: a failed trial's parameters re-queued, at most storage.max_retry times."""
    return optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=cfg_storage.max_retry)


def describe(cfg_storage: DictConfig) -> str:
    """Where the storage is, for messages: a file path, or a URL without its credentials."""
    url = str(cfg_storage.get("url") or cfg_storage.get("path"))
    path = sqlite_path(url)
    return str(path) if path is not None else url.split("@")[-1]


def make_storage(cfg_storage: DictConfig):
    """The study storage the config names: an RDB URL with heartbeats, or a journal file."""
    if "url" not in cfg_storage:
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path = Path(cfg_storage.path).expanduser().resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    url, path = cfg_storage.url, sqlite_path(cfg_storage.url)
    kwargs = dict(heartbeat_interval=cfg_storage.heartbeat_interval, grace_period=cfg_storage.grace_period,
                  heartbeat_stale_trial_callback=retry_callback(cfg_storage))
    try:
        if path is not None:
            with first_creates(path):
                sqlite_wal(path)
                storage = WorkerStorage(f"sqlite:///{path}", engine_kwargs={"connect_args": {"timeout": 60}},
                                        **kwargs)
            _serialize_sqlite(storage.engine)
            return storage
        with _pg_first_creates(url) if url.startswith("postgresql") else nullcontext():
            return WorkerStorage(url, engine_kwargs={"pool_pre_ping": True}, **kwargs)
    except Exception as e:
        raise UserError(_cannot_open(url, path, e)) from None


def _cannot_open(url: str, path: Path | None, e: Exception) -> str:
    """One line for a storage that does not open: what failed and the fix for its kind."""
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    if path is not None:
        return f"cannot open the Optuna storage {path}: {first}. Fix: storage.url must name a SQLite file you can write."
    where = url.split("@")[-1]  # no credentials on screen
    if isinstance(e, (ImportError, ModuleNotFoundError)) or "DB access module" in first:
        return (f"cannot open the Optuna storage {where}: its database driver is not installed ({first}). "
                "Fix: pip install 'psycopg[binary]' for postgresql:// URLs, psycopg2-binary for postgresql+psycopg2://.")
    return (f"cannot open the Optuna storage {where}: {first}. Fix: check storage.url ($FMNIST_STORAGE_URL, "
            "or PGHOST/PGPORT/PGUSER/PGDATABASE/PGPASSWORD) and that the server is up.")


def _serialize_sqlite(engine) -> None:
    """Every SQLite transaction takes the write lock when it begins (BEGIN IMMEDIATE).

    Python's sqlite3 starts a transaction only at its first write, so Optuna's
    read-check-write of a WAITING trial (an enqueued configuration, a retry) would not be
    atomic across processes: two workers could both take the same trial. PostgreSQL locks
    the row (SELECT ... FOR UPDATE) and needs none of this."""
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _no_implicit_begin(dbapi_connection, record):
        dbapi_connection.isolation_level = None

    sync_at_checkpoints(engine)

    @event.listens_for(engine, "begin")
    def _begin_immediate(conn):
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections made before the listeners existed

