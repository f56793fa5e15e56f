"""The MLflow record of a run: one client, batched writes, explicit run states."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import subprocess
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np

from .errors import UserError, stops_deferred

PARAM_LIMIT = 100  # MLflow accepts at most 100 params per log_batch request
# Fail a trial quickly when a tracking server is down, instead of retrying for minutes.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
# Our own lines say where runs are; MLflow's per-run "View run at" links would repeat them.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
# No progress bar per downloaded artifact (compare and finalize fetch many small files).
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# Schema creation on a fresh store is routine, not news.
logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
logging.getLogger("alembic").setLevel(logging.WARNING)


def git_commit() -> str:
    """The commit of the checkout this package runs from ('unknown' for a wheel)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def local_uri(uri: str) -> str:
    """Make a relative sqlite:/// path absolute and create its folder."""
    prefix = "sqlite:///"
    if uri.startswith(prefix):
        path = Path(uri[len(prefix):]).expanduser().resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        return prefix + str(path)
    return uri


def sqlite_wal(path: Path) -> None:
    """A local SQLite store (the Optuna study's, MLflow's) in write-ahead-log mode: readers
    do not wait for a writer (workers on one machine share both stores). The mode is kept
    in the file: set once, for every process."""
    import sqlite3

    with sqlite3.connect(path) as db:
        db.execute("PRAGMA journal_mode=WAL")


@contextmanager
def first_creates(path: Path):
    """Hold an exclusive lock beside the local store ``path`` while opening it: of processes
    started together on a fresh store, one creates its schema and the others then open it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _sync_at_checkpoints(dbapi_connection, record) -> None:
    dbapi_connection.execute("PRAGMA synchronous=NORMAL")


def store_engine(client):
    """The SQLAlchemy engine of an MlflowClient's database store; None for another store (HTTP)."""
    return getattr(client._tracking_client.store, "engine", None)


def sync_at_checkpoints(engine) -> None:
    """``engine``'s SQLite connections sync the log at checkpoints, not at every commit
    (synchronous=NORMAL, safe in WAL mode): an fsync per commit is a large share of an
    epoch's logging. The database stays consistent; a power cut (not a killed process)
    may lose its last commits."""
    from sqlalchemy import event

    if not event.contains(engine, "connect", _sync_at_checkpoints):
        event.listen(engine, "connect", _sync_at_checkpoints)
        engine.dispose()  # connections made before the listener existed


class Tracker:
    """One MLflow experiment; starts runs and writes them in batches. A stop signal that lands in
    a run's write waits for the write's end (errors.stops_deferred)."""

    def __init__(self, uri: str, experiment: str, artifact_root: str | None = None, create: bool = True):
        """``create=False`` (read-only commands) neither makes the store nor the experiment:
        ``experiment_id`` is then None where there is none."""
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        self.uri = local_uri(uri)
        self.experiment_id = None
        path = Path(self.uri[len("sqlite:///"):]) if self.uri.startswith("sqlite:///") else None
        local = path is not None and (create or path.exists())  # a local store to open (or make)
        try:
            # Processes starting together on a fresh local store: one migrates it, the others wait.
            with first_creates(path) if local else nullcontext():
                if local:
                    sqlite_wal(path)
                self.client = MlflowClient(tracking_uri=self.uri)
                if local and (engine := store_engine(self.client)) is not None:
                    sync_at_checkpoints(engine)
                if path is None or local:
                    self.experiment_id = self._experiment(experiment, artifact_root, create)
        except MlflowException as e:
            raise UserError(_unusable(self.uri, str(e))) from None

    def _experiment(self, name: str, artifact_root: str | None, create: bool) -> str | None:
        """The experiment's id; with ``create`` a missing one is made."""
        from mlflow.exceptions import MlflowException

        exp = self.client.get_experiment_by_name(name)
        if exp is not None or not create:
            return exp.experiment_id if exp is not None else None
        # One artifact folder per experiment (= per study), as MLflow's own default does.
        location = (Path(artifact_root).expanduser().resolve() / name).as_uri() if artifact_root else None
        try:
            # The kind makes MLflow's UI open the experiment as model training, not GenAI.
            return self.client.create_experiment(name, artifact_location=location,
                                                 tags={"mlflow.experimentKind": "custom_model_development"})
        except MlflowException:  # another process (on a tracking server) created it first
            return self.client.get_experiment_by_name(name).experiment_id

    def parent_run(self, study: str, start: dict | None = None) -> str | None:
        """The study's one parent run, found by its tags. With ``start`` (name, params, tags)
        a missing one is made, and a found one set RUNNING again (a resumed study); where
        processes race to make it, the oldest wins and the others delete theirs."""
        query = f"tags.`fmnist.role` = 'study' and tags.`optuna.study` = '{study}'"

        def oldest():
            if self.experiment_id is None:
                return None
            runs = self.client.search_runs([self.experiment_id], query, order_by=["attributes.start_time ASC"],
                                           max_results=1)
            return runs[0].info.run_id if runs else None

        run_id = oldest()
        if start is None:
            return run_id
        if run_id is not None:
            self.client.update_run(run_id, status="RUNNING")
            return run_id
        run_id = self.start(start["name"], start["params"], {**start["tags"], "fmnist.role": "study",
                                                               "optuna.study": study})
        if (first := oldest()) != run_id:
            self.client.delete_run(run_id)
        return first

    def end_orphans(self, study: str, states: dict, reason: str) -> None:
        """End KILLED the RUNNING runs of this study's trials that are no longer running in
        Optuna (``states``: trial number -> TrialState), with ``reason``."""
        query = f"attributes.status = 'RUNNING' and tags.`optuna.study` = '{study}'"
        for run in self.client.search_runs([self.experiment_id], query):
            number = run.data.tags.get("optuna.trial_number")
            state = states.get(int(number)) if number is not None else None
            if state is not None and state.is_finished():
                self.log(run.info.run_id, {}, tags={"optuna.state": state.name, "fmnist.failure": reason})
                self.end(run.info.run_id, "KILLED")

    @stops_deferred()
    def start(self, name: str, params: dict, tags: dict, parent_run_id: str | None = None) -> str:
        """A new run (child of ``parent_run_id`` if given) with its params and tags; its id."""
        from mlflow.entities import Param

        tags = dict(tags)
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        run = self.client.create_run(self.experiment_id, run_name=name,
                                     tags={k: str(v) for k, v in tags.items()})
        run_id = run.info.run_id
        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), PARAM_LIMIT):
            self.client.log_batch(run_id, params=items[i:i + PARAM_LIMIT])
        return run_id

    @stops_deferred()
    def log(self, run_id: str, metrics: dict[str, float], step: int | None = None,
            tags: dict | None = None) -> None:
        """One request for a whole epoch's metrics (and any tags)."""
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        self.client.log_batch(
            run_id,
            metrics=[Metric(k, float(v), now, step or 0) for k, v in metrics.items()],
            tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()])

    @stops_deferred()
    def log_datasets(self, run_id: str, splits: dict, source: str) -> None:
        """The run's data as MLflow dataset inputs, one request: ``splits`` maps a context
        (training, validation, test) to a data.Split; each is named fashion-mnist-CONTEXT and
        told apart by its digest (data checksum and indices), so runs on other splits differ."""
        from mlflow.entities import Dataset, DatasetInput, InputTag
        from mlflow.exceptions import MlflowException
        from mlflow.types import Schema, TensorSpec
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        schema = json.dumps({"mlflow_tensorspec": {
            "features": Schema([TensorSpec(np.dtype(np.uint8), (-1, 28, 28))]).to_json(),
            "targets": Schema([TensorSpec(np.dtype(np.int64), (-1,))]).to_json()}})
        inputs = [DatasetInput(Dataset(f"fashion-mnist-{context}", split.digest, "local", json.dumps({"uri": source}),
                                       schema, json.dumps({"num_rows": len(split)})),
                               [InputTag(MLFLOW_DATASET_CONTEXT, context)])
                  for context, split in splits.items()]
        try:
            self.client.log_inputs(run_id, datasets=inputs)
        except MlflowException as e:
            # Runs that log the same new dataset at one moment (workers started together): MLflow
            # looks it up, then inserts it, and all but one insert meet its key. That one is in
            # now: the same request links this run to it.
            text = str(e).lower()
            if "dataset" not in text or not ("unique" in text or "duplicate" in text):
                raise
            self.client.log_inputs(run_id, datasets=inputs)

    def log_artifacts(self, run_id: str, folder: Path) -> None:
        self.client.log_artifacts(run_id, str(folder))

    @stops_deferred()
    def end(self, run_id: str, status: str) -> None:
        self.client.set_terminated(run_id, status)


def resolve_checkpoint(ref: str | None, tracking_uri: str) -> str | None:
    """A local state_dict path for ``model.pretrained``: a file path, or the id
    (or runs:/ID) of an MLflow run that logged weights/state_dict.pt."""
    if ref is None:
        return None
    ref = str(ref)
    if Path(ref).expanduser().is_file():
        return str(Path(ref).expanduser())
    run_id = ref.removeprefix("runs:/").split("/")[0]
    if len(run_id) == 32 and all(c in "0123456789abcdef" for c in run_id):
        import mlflow.artifacts
        from mlflow.exceptions import MlflowException

        try:
            return mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="weights/state_dict.pt",
                                                       tracking_uri=local_uri(tracking_uri))
        except (MlflowException, OSError) as e:
            raise UserError(f"model.pretrained={ref}: cannot fetch weights/state_dict.pt from that MLflow run "
                            f"({str(e).splitlines()[0]}).") from None
    raise UserError(f"model.pretrained={ref}: no such file, and not an MLflow run id. "
                    "Fix: give the path of an autoencoder state_dict.pt or the run id of an autoencoder run.")


def _unusable(uri: str, text: str) -> str:
    """One line for a tracking store or server that cannot be used."""
    reason = next((r for r in ("Connection refused", "timed out", "Name or service not known",
                               "No route to host") if r in text), None)
    if reason and uri.startswith("http"):
        return (f"MLflow tracking server {uri} is unreachable ({reason.lower()}). Fix: start "
                "it, or point $MLFLOW_TRACKING_URI at it; tracking=local needs no server.")
    return f"MLflow tracking store {uri} is not usable: {text.splitlines()[0][:300]}. Fix: check tracking.uri / $MLFLOW_TRACKING_URI."
