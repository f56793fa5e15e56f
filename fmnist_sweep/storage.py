"""The Optuna storage a study lives in: SQLite (the embedded default), a journal file,
PostgreSQL, Optuna's gRPC proxy in front of one, or a journal on Redis. Durability is
Optuna's: heartbeats (RDB storages), and a retry callback that re-queues the trial of a
worker that stopped beating. What this module adds is how a worker opens it: the first
process creates a fresh store while the others wait for it."""

from __future__ import annotations

import sys
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path

import optuna
import sqlalchemy
import sqlalchemy.exc
from omegaconf import DictConfig
from optuna.trial import TrialState

from .errors import UserError, behind, stops_deferred
from .tracking import first_creates, sqlite_wal, sync_at_checkpoints

warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeat and retry


def connection_errors() -> tuple:
    """What a cut connection to the study storage raises: the database driver's errors (Optuna
    wraps some as StorageInternalError), and those of the gRPC proxy's and Redis's clients
    where a storage of that kind has imported them (an unimported client raises nothing, and
    a process on a database storage never pays their import)."""
    errors = [sqlalchemy.exc.DBAPIError, optuna.exceptions.StorageInternalError]
    if (grpc := sys.modules.get("grpc")) is not None:
        errors.append(grpc.RpcError)
    if (redis := sys.modules.get("redis.exceptions")) is not None:
        errors += [redis.ConnectionError, redis.TimeoutError]
    return tuple(errors)


def connection_error(e: BaseException | None) -> BaseException | None:
    """The storage connection error behind ``e``, if any (Optuna's optimize can raise another
    error from its own clean-up when its tell meets the cut)."""
    return behind(e, connection_errors())


class WorkerStorage(optuna.storages.RDBStorage):
    """Optuna's RDB storage as one worker process uses it.

    ``held`` is the waiting trial (enqueued, or re-queued) this process last took: after a
    cut inside ``study.ask`` the worker knows which trial to fail and re-queue. A trial's state
    is written whole before a stop signal is raised (Optuna's tell keeps a finished trial's result).
    A heartbeat that meets a cut connection is skipped rather than ending Optuna's heartbeat
    thread, so a trial that outlives an outage keeps beating."""

    held: int | None = None

    def set_trial_state_values(self, trial_id, state, values=None) -> bool:
        with stops_deferred():
            taken = super().set_trial_state_values(trial_id, state=state, values=values)
        if taken and state == TrialState.RUNNING:
            self.held = trial_id
        return taken

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            super().record_heartbeat(trial_id)
        except connection_errors():
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
    if "proxy" in cfg_storage:
        return f"grpc://{cfg_storage.proxy.host}:{cfg_storage.proxy.port} (storage proxy)"
    url = str(cfg_storage.get("url") or cfg_storage.get("path") or cfg_storage.get("redis_url"))
    path = sqlite_path(url)
    return str(path) if path is not None else url.split("@")[-1]


def make_storage(cfg_storage: DictConfig):
    """The study storage the config names: an RDB URL with heartbeats, a storage proxy, a
    journal on Redis, or a journal file."""
    if "proxy" in cfg_storage:
        return _proxy(cfg_storage.proxy)
    if "redis_url" in cfg_storage:
        return _redis_journal(cfg_storage)
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


def _proxy(cfg_proxy: DictConfig):
    """A client of Optuna's gRPC storage proxy, once the proxy answers."""
    proxy = optuna.storages.GrpcStorageProxy(host=cfg_proxy.host, port=int(cfg_proxy.port))
    try:
        proxy.wait_server_ready(timeout=cfg_proxy.connect_timeout)
    except ConnectionError:
        proxy.close()
        raise UserError(f"the storage proxy {cfg_proxy.host}:{cfg_proxy.port} did not answer within "
                        f"{cfg_proxy.connect_timeout} s. Fix: start it (python -m fmnist_sweep storage-proxy "
                        "storage=postgres), or set $FMNIST_PROXY_HOST / $FMNIST_PROXY_PORT.") from None
    return proxy


def _redis_journal(cfg_storage: DictConfig):
    """Optuna's journal storage on the Redis server at storage.redis_url."""
    from optuna.storages.journal import JournalRedisBackend, JournalStorage

    try:
        return JournalStorage(JournalRedisBackend(cfg_storage.redis_url, prefix=cfg_storage.prefix))
    except connection_errors() as e:
        where = cfg_storage.redis_url.split("@")[-1]
        raise UserError(f"cannot open the Optuna storage {where}: {str(e).splitlines()[0]}. Fix: start Redis "
                        "there, or set $FMNIST_REDIS_URL.") from None


def serve_proxy(cfg_storage: DictConfig, host: str, port: int) -> None:
    """Run Optuna's gRPC storage proxy for the RDB storage the config names, until stopped."""
    if "url" not in cfg_storage:
        raise UserError("storage-proxy serves a database storage: add storage=postgres (or storage=sqlite)")
    storage = make_storage(cfg_storage)
    print(f"storage proxy for {describe(cfg_storage)} on {host}:{port}; workers: storage=grpc "
          f"storage.proxy.host=HOST storage.proxy.port={port}", flush=True)
    optuna.storages.run_grpc_proxy_server(storage, host=host, port=port)


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
    the row (SELECT ... FOR UPDATE) and needs none of this.

    A stop signal raised inside SQLAlchemy's execution of a statement (or its fetch) is not a lost
    connection: the statement's cursor is closed and its transaction rolled back as for any error.
    (By default SQLAlchemy takes a stop there for a lost connection and closes it with the statement
    unfinished; SQLite keeps a connection closed so open, write lock and all, while the stop's
    traceback holds the statement, and the same process's next write, its trial's interrupted mark,
    waits on itself for the busy timeout.)"""
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _no_implicit_begin(dbapi_connection, record):
        dbapi_connection.isolation_level = None

    sync_at_checkpoints(engine)

    @event.listens_for(engine, "begin")
    def _begin_immediate(conn):
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    @event.listens_for(engine, "handle_error")
    def _a_stop_is_not_a_disconnect(context):
        if isinstance(context.original_exception, KeyboardInterrupt):
            context.is_disconnect = False

    engine.dispose()  # connections made before the listeners existed

