"""Optuna studies over Hydra-composed runs. A study is one MLflow experiment
with one parent run; every trial is a nested child run trained by train.run."""

from __future__ import annotations

import copy
import difflib
import hashlib
import math
import os
import shlex
import socket
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import optuna
import sqlalchemy.exc
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState

from . import train
from .config import compose, config_fingerprint, flat_keys, resource_dir
from .errors import StorageLost, UserError
from .space import SearchSpace
from .tracking import Tracker, sqlite_wal, sync_at_checkpoints

optuna.logging.set_verbosity(optuna.logging.WARNING)
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

# Metrics a trial can be judged on: per epoch (pruning reads these) and at the end.
EPOCH_METRICS = ("val/accuracy", "val/loss", "train/loss", "perf/images_per_s", "perf/epoch_seconds")
FINAL_METRICS = EPOCH_METRICS + ("model/n_params", "perf/train_seconds")
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED)  # what fills a study's n_trials budget

SAMPLERS = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler,
            "grid": optuna.samplers.GridSampler, "cmaes": optuna.samplers.CmaEsSampler,
            "gp": optuna.samplers.GPSampler, "nsga2": optuna.samplers.NSGAIISampler}
PRUNERS = {"median": optuna.pruners.MedianPruner, "percentile": optuna.pruners.PercentilePruner,
           "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
           "hyperband": optuna.pruners.HyperbandPruner, "none": optuna.pruners.NopPruner}


class TrialFailed(Exception):
    """A trial whose run failed (diverged, crashed): the study goes on."""


class Surplus(Exception):
    """A trial asked for after the budget was taken by finished and running trials."""


CUT = "the study storage connection was lost; the trial is re-queued"
TAKEN_OVER = ("failed and re-queued by another worker's heartbeat check while it ran here (no heartbeat "
              "reached the storage for storage.grace_period seconds)")

# What a cut connection to the study storage raises (Optuna wraps some errors as
# StorageInternalError); StorageLost carries one out of a trial's training.
CONNECTION_ERRORS = (sqlalchemy.exc.DBAPIError, optuna.exceptions.StorageInternalError)


def _connection_error(e: BaseException | None):
    """The storage connection error behind ``e``, if any: ``e`` itself, what it was raised
    from, or what was being handled when it was raised — Optuna's optimize can turn one
    into another error (when its tell and then its read of the trial both meet the cut,
    it raises UnboundLocalError from its own finally block)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, CONNECTION_ERRORS):
            return e
        e = e.__cause__ or e.__context__
    return None


class WorkerStorage(optuna.storages.RDBStorage):
    """Optuna's RDB storage as a worker that can lose its connection needs it.

    - It knows the trial this process holds: the last one it created running, or took
      from the waiting queue (an enqueued or re-queued trial); not one it re-queued for
      any worker to take (a heartbeat check's retry). After a cut the
      worker fails that trial at once and re-queues it (Study._release_held), instead
      of leaving it RUNNING for other workers to wait on: with no heartbeat recorded yet
      (a cut inside ``study.ask``), Optuna's check never sees it, and ours takes two grace
      periods (2 minutes with PostgreSQL's defaults).
    - A heartbeat that fails on a cut connection does not end Optuna's heartbeat thread
      (its thread has no ``except``): the next beat, an interval later, goes through the
      reconnected pool. Without this a trial that outlived the grace period after a cut
      was failed under its running worker and trained twice."""

    held: int | None = None

    def _create_new_trial(self, study_id, template_trial=None):
        frozen = super()._create_new_trial(study_id, template_trial)
        if frozen.state == TrialState.RUNNING:  # not a trial it re-queues (WAITING) for any worker
            self.held = frozen._trial_id
        return frozen

    def set_trial_state_values(self, trial_id, state, values=None) -> bool:
        taken = super().set_trial_state_values(trial_id, state=state, values=values)
        if taken and state == TrialState.RUNNING:  # a waiting trial this process took
            self.held = trial_id
        return taken

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            super().record_heartbeat(trial_id)
        except CONNECTION_ERRORS:
            pass


@dataclass
class Sweep:
    """One sweeps/NAME.yaml."""

    name: str
    objectives: list[tuple[str, str]]  # (metric, "maximize" | "minimize")
    n_trials: int
    space: SearchSpace
    sampler: dict = field(default_factory=lambda: {"name": "tpe"})
    pruner: dict = field(default_factory=lambda: {"name": "none"})
    enqueue: list = field(default_factory=list)
    max_failures: int | None = None

    @property
    def fingerprint(self) -> str:
        text = repr((self.objectives, self.space.fingerprint()))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def sweep_names() -> list[str]:
    return sorted(p.stem for p in resource_dir("sweeps").glob("*.yaml"))


def load_sweep(name: str) -> Sweep:
    """sweeps/NAME.yaml, or any YAML file given by its path (sweep=path/to/mine.yaml)."""
    if name.endswith((".yaml", ".yml")):
        path = Path(name).expanduser()
        if not path.is_file():
            raise UserError(f"sweep file {path} does not exist")
        name = path.stem
    else:
        path = resource_dir("sweeps") / f"{name}.yaml"
    if not path.is_file():
        close = difflib.get_close_matches(name, sweep_names(), n=1)
        raise UserError(f"unknown sweep '{name}'. Choose one of: {', '.join(sweep_names())}."
                        + (f" Did you mean {close[0]}?" if close else ""))
    spec = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    known = {"objective", "direction", "objectives", "n_trials", "sampler", "pruner", "params", "enqueue",
             "max_failures"}
    unknown = set(spec) - known
    if unknown:
        raise UserError(f"{path}: unknown keys {sorted(unknown)}; allowed: {sorted(known)}")
    if "objectives" in spec:
        objectives = [(o["metric"], o.get("direction", "maximize")) for o in spec["objectives"]]
    else:
        objectives = [(spec.get("objective", "val/accuracy"), spec.get("direction", "maximize"))]
    for metric, direction in objectives:
        if metric not in FINAL_METRICS:
            raise UserError(f"{path}: unknown objective metric '{metric}'. Choose from: {', '.join(FINAL_METRICS)}.")
        if direction not in ("maximize", "minimize"):
            raise UserError(f"{path}: direction of {metric} must be maximize or minimize, not {direction!r}")
    if len(objectives) == 1 and objectives[0][0] not in EPOCH_METRICS and spec.get("pruner", {}).get("name", "none") != "none":
        raise UserError(f"{path}: pruning needs a per-epoch objective ({', '.join(EPOCH_METRICS)})")
    if len(objectives) > 1 and spec.get("pruner", {}).get("name", "none") != "none":
        raise UserError(f"{path}: Optuna cannot prune multi-objective studies: set pruner: {{name: none}}")
    space = SearchSpace(spec.get("params") or {})
    n_trials = spec.get("n_trials")
    if n_trials is None and (spec.get("sampler") or {}).get("name") == "grid":
        n_trials = math.prod(len(v) for v in space.grid().values())  # the whole grid, once
    if not isinstance(n_trials, int) or n_trials < 1:
        raise UserError(f"{path}: n_trials must be an integer >= 1")
    return Sweep(name, objectives, n_trials, space,
                 spec.get("sampler") or {"name": "tpe"}, spec.get("pruner") or {"name": "none"},
                 spec.get("enqueue") or [], spec.get("max_failures"))


def _build(spec: dict, table: dict, kind: str, **extra):
    spec = dict(spec)
    if "_target_" in spec:
        return instantiate(spec, **extra)
    name = spec.pop("name", None)
    if name not in table:
        raise UserError(f"unknown {kind} '{name}'. Choose one of: {', '.join(table)} (or give _target_).")
    return table[name](**extra, **spec)


def make_sampler(sweep: Sweep, seed: int):
    spec = {"seed": seed, **sweep.sampler}

    def build(seed):
        if spec.get("name") == "grid":  # its search space comes from the sweep's params
            return optuna.samplers.GridSampler(sweep.space.grid(), **{k: v for k, v in spec.items()
                                                                      if k not in ("name", "seed")}, seed=seed)
        return _build({**spec, "seed": seed}, SAMPLERS, "sampler")

    sampler = build(spec.get("seed"))  # a bad sampler spec is an error now, not at the first trial
    if spec.get("seed") is None or isinstance(sampler, SHARED_SEED):
        return sampler
    return WorkerSeededSampler(build, spec["seed"])


# Samplers whose workers coordinate through the study and need one seed in all of them:
# the grid's seed orders the grid (trial k runs point k), QMC's scrambles its sequence.
SHARED_SEED = (optuna.samplers.GridSampler, optuna.samplers.QMCSampler)


class WorkerSeededSampler(optuna.samplers.BaseSampler):
    """A seeded sampler that draws a different sequence in each worker of a study.

    Workers of one study each build their sampler from the same spec: with one seed,
    every worker drew the same parameters in lockstep (two workers trained each point
    twice; a resumed study drew its first trials again). This builds the real sampler at
    the worker's first trial, seeded with seed + that trial's number — unique per worker,
    and the same on a re-run (a one-worker study on a fresh storage draws what the plain
    seeded sampler draws). Not for the samplers whose workers coordinate through the
    study with one seed (SHARED_SEED: grid, QMC)."""

    def __init__(self, build, seed: int):
        self._build, self._seed, self._sampler = build, seed, None

    def _base(self, trial=None) -> optuna.samplers.BaseSampler:
        if self._sampler is None:
            self._sampler = self._build(self._seed + (trial.number if trial is not None else 0))
        return self._sampler

    @property
    def base(self) -> optuna.samplers.BaseSampler:
        """The sampler that draws (the sweep's sampler, seeded for this worker)."""
        return self._base()

    def before_trial(self, study, trial) -> None:
        self._base(trial).before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):
        return self._base(trial).infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._base(trial).sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._base(trial).sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values) -> None:
        self._base(trial).after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._base().reseed_rng()


def make_pruner(sweep: Sweep, epochs: int):
    spec = dict(sweep.pruner)
    if spec.get("name") == "hyperband":
        spec.setdefault("max_resource", epochs)
    if spec.get("name") == "percentile":
        spec.setdefault("percentile", 25.0)  # prune below the best quarter's level
    return _build(spec, PRUNERS, "pruner")


def make_storage(cfg_storage: DictConfig):
    """Optuna storage: an RDB URL (SQLite, PostgreSQL) with heartbeats, or a journal file."""
    if "url" in cfg_storage:
        url = cfg_storage.url
        if url.startswith("sqlite:///"):
            path = Path(url[len("sqlite:///"):]).expanduser().resolve()
            path.parent.mkdir(parents=True, exist_ok=True)
            url = f"sqlite:///{path}"
            sqlite_wal(path)
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=cfg_storage.max_retry)
        error: Exception = RuntimeError("the schema could not be created")
        for attempt in range(5):
            try:
                storage = WorkerStorage(
                    url, engine_kwargs={"pool_pre_ping": True} if not url.startswith("sqlite") else
                    {"connect_args": {"timeout": 60}},
                    heartbeat_interval=cfg_storage.heartbeat_interval, grace_period=cfg_storage.grace_period,
                    heartbeat_stale_trial_callback=retry)
                if url.startswith("sqlite"):
                    _serialize_sqlite(storage.engine)
                return storage
            except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError) as e:
                # Workers starting together on a fresh database race to create the schema
                # (UniqueViolation on pg_type, or DuplicateObject "type ... already exists"):
                # the loser finds it made on its next attempt.
                error = e
                if isinstance(e, sqlalchemy.exc.ProgrammingError) and "already exists" not in str(e):
                    break
                time.sleep(0.5 * (attempt + 1))
            except Exception as e:
                error = e
                break
        raise UserError(f"cannot open the Optuna storage {url.split('@')[-1]}: {str(error).splitlines()[0]}. "
                        "Fix: check storage.url ($FMNIST_STORAGE_URL, or PGHOST/PGPORT/PGUSER/"
                        "PGDATABASE/PGPASSWORD) and that the server is up.")
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    path = Path(cfg_storage.path).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(path)))


def _serialize_sqlite(engine) -> None:
    """Every SQLite transaction takes the write lock when it begins (BEGIN IMMEDIATE).

    Python's sqlite3 starts a transaction only at its first write, so Optuna's
    read-check-write of a WAITING trial (an enqueued configuration, a heartbeat retry)
    is not atomic across processes: two workers could both claim the same trial, and
    the one that finished second crashed with "Cannot tell a COMPLETE trial".
    PostgreSQL locks the row (SELECT ... FOR UPDATE) and needs none of this."""
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _no_implicit_begin(dbapi_connection, record):
        dbapi_connection.isolation_level = None

    sync_at_checkpoints(engine)

    @event.listens_for(engine, "begin")
    def _begin_immediate(conn):
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections made before the listeners existed (sync_at_checkpoints' too)


def _base_overrides(overrides: list[str]) -> list[str]:
    """The user's command line minus what selects or sizes the study: with
    ``sweep=null`` appended it re-runs a single trial."""
    drop = ("sweep=", "study.")
    return [o for o in overrides if not o.lstrip("+~").startswith(drop)]


class Study:
    """An Optuna study bound to its sweep, its storage and its MLflow parent run."""

    # A worker waiting on the study's last trials looks again every second (one count query
    # on cached trials): it ends within a second of the last one, not up to 5 s late.
    poll_seconds = 1.0

    def __init__(self, cfg: DictConfig, overrides: list[str], fork: bool = False, check_space: bool = True):
        self.cfg = cfg
        self.sweep = load_sweep(cfg.sweep)
        self.base = _base_overrides(overrides)
        self._keys_cache: dict[tuple[str, ...], frozenset[str]] = {}
        self.name = cfg.study.name or self.sweep.name
        self.n_trials = cfg.study.n_trials or self.sweep.n_trials
        self.storage = make_storage(cfg.storage)
        if fork:
            self.name = f"{self.name}-{self.sweep.fingerprint[:8]}"
        self.optuna = optuna.create_study(
            study_name=self.name, storage=self.storage, load_if_exists=True,
            sampler=make_sampler(self.sweep, cfg.seed), pruner=make_pruner(self.sweep, cfg.trainer.epochs),
            directions=[d for _, d in self.sweep.objectives])
        attrs = self.optuna.user_attrs
        if "fmnist.space" not in attrs:
            self.optuna.set_user_attr("fmnist.space", self.sweep.fingerprint)
            self.optuna.set_user_attr("fmnist.sweep", str(cfg.sweep))  # a name, or the path of a sweep file
            self.optuna.set_user_attr("fmnist.params", self.sweep.space.text)
            self.optuna.set_user_attr("fmnist.objectives", self.sweep.objectives)
            for params in self.sweep.enqueue:
                self.optuna.enqueue_trial(dict(params), skip_if_exists=True)
        elif check_space and attrs["fmnist.space"] != self.sweep.fingerprint:
            raise UserError(f"study '{self.name}' was created with another search space or objective "
                            f"(sweeps/{self.sweep.name}.yaml changed since). Run with --fork to start a new "
                            f"study '{self.name}-{self.sweep.fingerprint[:8]}', or set study.name=NEW.")
        self.tracker = Tracker(cfg.tracking.uri, self.name, cfg.tracking.artifact_root)
        self.parent_run_id = self._parent_run()
        self.target = self.n_trials
        self.host = socket.gethostname()
        self.device = train.device_label(cfg.trainer.device)
        self._beaten: set[int] = set()  # trials given a heartbeat by _fail_stale_trials
        self._taken_over: int | None = None  # a trial of ours another worker's heartbeat check failed
        self._cut: int | None = None  # a trial whose training stopped on a cut connection
        self._run: tuple[int, str] | None = None  # (trial number, MLflow run) of the last objective call
        # (set as soon as the run exists: before the trial's mlflow_run_id attribute, which a cut can stop)
        self._lost = 0  # storage connections lost since the last finished trial

    # --- MLflow ---------------------------------------------------------------------------------
    def _parent_run(self) -> str:
        """The study's one parent run: found by tag, else created; if processes race, the
        oldest wins and the others delete theirs."""
        client = self.tracker.client
        query = f"tags.`fmnist.role` = 'study' and tags.`optuna.study` = '{self.name}'"

        def existing():
            return client.search_runs([self.tracker.experiment_id], query, order_by=["attributes.start_time ASC"],
                                      max_results=5)

        runs = existing()
        if runs:
            run_id = runs[0].info.run_id
            client.update_run(run_id, status="RUNNING")
        else:
            command = "python -m fmnist_sweep " + shlex.join(self.base + [f"sweep={self.sweep.name}"])
            run_id = self.tracker.start(
                f"study {self.name}", {"sweep": self.sweep.name, "n_trials": self.n_trials,
                                        **{f"space.{k}": v for k, v in self.sweep.space.text.items()}},
                {"fmnist.role": "study", "optuna.study": self.name, "fmnist.command": command,
                 "optuna.directions": ",".join(d for _, d in self.sweep.objectives),
                 "optuna.objectives": ",".join(m for m, _ in self.sweep.objectives)})
            oldest = existing()[0].info.run_id
            if oldest != run_id:
                client.delete_run(run_id)
                run_id = oldest
        self.optuna.set_user_attr("mlflow_parent_run_id", run_id)
        return run_id

    def _end_orphans(self) -> None:
        """MLflow runs of trials that are no longer running in Optuna (a dead worker's,
        failed by the heartbeat check) must not stay RUNNING."""
        client = self.tracker.client
        query = f"attributes.status = 'RUNNING' and tags.`optuna.study` = '{self.name}'"
        states = {t.number: t.state for t in self.optuna.get_trials(deepcopy=False)}
        for run in client.search_runs([self.tracker.experiment_id], query):
            number = run.data.tags.get("optuna.trial_number")
            if number is not None and states.get(int(number)) not in (TrialState.RUNNING, None):
                self.tracker.log(run.info.run_id, {}, tags={
                    "optuna.state": states[int(number)].name,
                    "fmnist.failure": "its worker stopped (Optuna's heartbeat check failed the trial)"})
                self.tracker.end(run.info.run_id, "KILLED")

    # --- one trial ------------------------------------------------------------------------------
    def _keys_for(self, overrides: list[str]) -> frozenset[str]:
        """The config keys present with these group choices: listed once per distinct choice."""
        key = tuple(overrides)
        if key not in self._keys_cache:
            self._keys_cache[key] = frozenset(flat_keys(compose(self.base + ["sweep=null"] + overrides)))
        return self._keys_cache[key]

    def objective(self, trial: optuna.Trial):
        self._run = None
        try:
            return self._objective(trial)
        except CONNECTION_ERRORS as e:
            # A cut outside training (reading the study, storing the run's id) is not the
            # trial's failure either: the worker re-queues it (_release_held), and the run it
            # made, if any, is tagged FAIL there — never left saying COMPLETE.
            self._cut = trial.number
            raise StorageLost(CUT) from e
        except optuna.exceptions.UpdateFinishedTrialError:  # done here, but retried elsewhere
            self._taken_over = trial.number
            if self._run is not None:
                self.tracker.log(self._run[1], {}, tags={"optuna.state": "FAIL", "fmnist.failure": TAKEN_OVER})
            raise StorageLost(TAKEN_OVER) from None

    def _objective(self, trial: optuna.Trial):
        trial.set_user_attr("host", self.host)
        trial.set_user_attr("worker", f"{self.host}:{os.getpid()}")
        trial.set_user_attr("device", self.device)
        trials = self.optuna.get_trials(deepcopy=False)  # one read serves both checks below
        earlier = [t for t in trials if t.state == TrialState.RUNNING and t.number < trial.number]
        if _finished(self.counts(trials)) + len(earlier) >= self.target:
            trial.set_user_attr("fmnist.surplus", True)
            raise Surplus(f"the budget of {self.target} is taken by finished and running trials")
        trial_overrides = self.sweep.space.suggest(trial, self._keys_for)
        chosen = {o.split("=", 1)[0] for o in trial_overrides}
        line = [o for o in self.base if o.lstrip("+~").split("=", 1)[0] not in chosen] + ["sweep=null"] + trial_overrides
        cfg = compose(line)
        cfg.trainer.progress = False  # the study prints one line per trial instead
        fp = config_fingerprint(cfg)
        trial.set_user_attr("overrides", shlex.join(line))
        trial.set_user_attr("fingerprint", fp)
        tags = {"optuna.study": self.name, "optuna.trial_number": trial.number, "fmnist.host": self.host}
        twin = next((t for t in trials if t.state == TrialState.COMPLETE
                     and t.user_attrs.get("fingerprint") == fp), None)
        if twin is not None:
            return self._reuse(trial, twin, line, tags)
        single = len(self.sweep.objectives) == 1
        metric = self.sweep.objectives[0][0]

        def report(epoch, metrics):
            if not single or metric not in metrics:
                return False
            try:
                trial.report(metrics[metric], epoch)
                return trial.should_prune()
            except CONNECTION_ERRORS as e:  # not the trial's failure: the worker reconnects, re-queues it
                self._cut = trial.number
                raise StorageLost(CUT) from e
            except optuna.exceptions.UpdateFinishedTrialError as e:
                self._taken_over = trial.number
                raise StorageLost(TAKEN_OVER) from e

        result = train.run(cfg, line, report=report, parent_run_id=self.parent_run_id, tags=tags,
                           tracker=self.tracker, name=f"trial {trial.number}")
        self._run = (trial.number, result.run_id)
        trial.set_user_attr("mlflow_run_id", result.run_id)
        state = {"FINISHED": "COMPLETE", "KILLED": "PRUNED"}.get(result.status, "FAIL")
        self.tracker.log(result.run_id, {}, tags={"optuna.state": state})
        if state == "PRUNED":
            raise optuna.TrialPruned(result.message)
        if state == "FAIL":
            trial.set_user_attr("failure", result.message)
            raise TrialFailed(result.message)
        values = [result.metrics[m] for m, _ in self.sweep.objectives]
        return values[0] if single else values

    def _reuse(self, trial, twin, line, tags):
        """Same composed config as a finished trial: take its result instead of retraining."""
        trial.set_user_attr("duplicate_of", twin.number)
        run_id = self.tracker.start(f"trial {trial.number}", {}, {**tags, "optuna.state": "COMPLETE",
                                                          "fmnist.duplicate_of_trial": twin.number,
                                                          "fmnist.duplicate_of_run": twin.user_attrs.get("mlflow_run_id", ""),
                                                          "fmnist.overrides": shlex.join(line)},
                                    parent_run_id=self.parent_run_id)
        self._run = (trial.number, run_id)
        self.tracker.log(run_id, {m: v for (m, _), v in zip(self.sweep.objectives, twin.values)})
        self.tracker.end(run_id, "FINISHED")
        trial.set_user_attr("mlflow_run_id", run_id)
        return twin.values[0] if len(twin.values) == 1 else twin.values

    # --- the loop ------------------------------------------------------------------------------
    def counts(self, trials=None) -> dict[str, int]:
        """Trials per state; surplus trials (closed untrained) apart from real failures."""
        counts = {s.name: 0 for s in TrialState} | {"SURPLUS": 0}
        for t in self.optuna.get_trials(deepcopy=False) if trials is None else trials:
            surplus = t.state == TrialState.FAIL and t.user_attrs.get("fmnist.surplus")
            counts["SURPLUS" if surplus else t.state.name] += 1
        return counts

    def optimize(self, more: int | None = None) -> None:
        """Run trials until the study holds its budget of COMPLETE+PRUNED trials.

        Many processes may run this on one storage. A worker asks for its next trial
        as soon as it is free; a trial that finds the budget already taken by finished
        trials plus running trials numbered below it is surplus: it is closed at once
        (FAIL, tagged surplus, never trained) and its worker waits until the running
        trials finish (then exits) or one of them dies (then takes its place)."""
        done = self.finished()
        self.target = self.n_trials if more is None else done + more
        if done >= self.target:
            print(f"study {self.name}: {done} of {self.target} trials already done; --more N adds trials")
            return
        print(f"study {self.name}: {done} of {self.target} trials done, {self.target - done} to run "
              f"(storage {self._where()}, MLflow experiment '{self.name}', {self.host} {self.device})", flush=True)
        self._t0, self._started, self._failures = time.perf_counter(), done, 0
        self._max_failures = self.sweep.max_failures or max(3, self.target - self._started)
        self._lost = 0
        while True:
            try:
                # A cut connection, or a server restarting: paused and retried inside; the pool
                # reconnects (pre-ping) and the trial it interrupted is re-queued.
                self.reconnecting(self._round)
                break
            except KeyboardInterrupt:
                self.tracker.end(self.parent_run_id, "KILLED")
                raise
            except UserError:  # the storage lost too many times in a row, taken-over trial or not
                raise
            except Exception:
                if self._taken_over is None:
                    raise
                # Optuna cannot tell a trial that is already finished (ValueError): this worker goes on.
                print(f"trial {self._taken_over}: {TAKEN_OVER}; going on with the next trial", flush=True)
        self.reconnecting(self._end_orphans)
        self.tracker.end(self.parent_run_id, "FINISHED")

    def _round(self) -> None:
        """Trials until the budget is met, after what an earlier round left behind."""
        self._taken_over = None
        self._release_held()  # the trial a cut connection interrupted, if any
        # Trials of dead workers: failed (and re-queued) by Optuna, their MLflow runs ended here.
        self._fail_stale_trials()
        self._end_orphans()
        self.optuna.optimize(self.objective, callbacks=[self._after_trial], catch=(TrialFailed, Surplus))

    def _pause(self, cut: BaseException) -> None:
        """After a lost storage connection: pauses that grow (2, 4, ... 10 s: 30 s in all)
        until a trial finishes again; the sixth loss in a row ends the worker with one line."""
        self._lost += 1
        first = str(cut).splitlines()[0] if str(cut) else type(cut).__name__
        if self._lost > 5:
            raise UserError(f"lost the study storage {self._where()} {self._lost} times in a row: "
                            f"{first}") from None
        print(f"storage connection lost ({first[:80]}); reconnecting", flush=True)
        time.sleep(min(2 * self._lost, 10))

    def reconnecting(self, fn):
        """``fn()``, again after each lost storage connection (with the loop's pauses): the
        study's closing reads (after its last trial) and its report ride out an outage too."""
        while True:
            try:
                return fn()
            except Exception as e:
                cut = _connection_error(e)
                if cut is None:
                    raise
                self._pause(cut)

    def _release_held(self) -> None:
        """After a cut connection: the trial this worker was running when it was cut is
        failed now and re-queued with its parameters (Optuna's retry callback, within
        storage.max_retry), as Optuna's heartbeat check would do a grace period later.
        Left as it is: a finished trial (a FAIL too, unless its objective stopped on the cut:
        a failure of its own, a surplus trial), one another worker's check already
        re-queued. A connection error propagates (the storage is still down): the trial
        stays held for the loop's next round."""
        storage = self.storage
        trial_id = getattr(storage, "held", None)
        if trial_id is None:
            return
        trial = storage.get_trial(trial_id)
        requeue = trial.state == TrialState.RUNNING or (
            trial.state == TrialState.FAIL and trial.number == self._cut
            and not any(optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == trial.number
                        for t in self.optuna.get_trials(deepcopy=False)))
        if requeue:
            try:
                if trial.state == TrialState.RUNNING:
                    storage.set_trial_state_values(trial_id, TrialState.FAIL)
                if self._run and self._run[0] == trial.number:  # its run's result never reached the study
                    self.tracker.log(self._run[1], {}, tags={"optuna.state": "FAIL", "fmnist.failure": CUT})
                retry = storage.get_heartbeat_stale_trial_callback()
                if retry is not None:
                    retry(self.optuna, copy.deepcopy(storage.get_trial(trial_id)))
            except optuna.exceptions.UpdateFinishedTrialError:
                pass  # another worker's heartbeat check failed it first, and re-queued it
        storage.held = self._cut = None

    def _fail_stale_trials(self) -> None:
        """Optuna's heartbeat check: trials of dead workers are failed (and re-queued).

        Optuna looks only at trials with a heartbeat on record. A worker killed, or cut
        off for good, between creating a trial and its first heartbeat leaves that trial
        RUNNING with none, for ever (a worker that reconnects releases it itself:
        _release_held): the study's last workers would wait for it without end. So a RUNNING trial
        older than the grace period gets one heartbeat from here, once; the check fails it
        a grace period later unless its worker is alive and beating (one more beat does
        that worker no harm)."""
        optuna.storages.fail_stale_trials(self.optuna)
        if not (isinstance(self.storage, optuna.storages.RDBStorage) and self.storage.heartbeat_interval):
            return
        grace = self.storage.grace_period or 2 * self.storage.heartbeat_interval  # Optuna's default
        now = datetime.now()
        for t in self.optuna.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if (t._trial_id not in self._beaten and t.datetime_start is not None
                    and (now - t.datetime_start).total_seconds() > grace):
                self.storage.record_heartbeat(t._trial_id)
                self._beaten.add(t._trial_id)

    def finished(self) -> int:
        """COMPLETE + PRUNED trials: what fills the budget."""
        return _finished(self.counts())

    def _after_trial(self, study, frozen) -> None:
        self._lost = 0
        c = self.counts()
        if not frozen.user_attrs.get("fmnist.surplus", False):
            self._print_trial(frozen, c)
            self._failures += frozen.state == TrialState.FAIL
            if self._failures >= self._max_failures:
                print(f"stopping: {self._failures} trials failed in this session "
                      f"(max_failures {self._max_failures})", flush=True)
                study.stop()
                return
        said = False
        while True:  # budget taken by trials still running: wait for them, or for a place
            if _finished(c) >= self.target:
                study.stop()
                return
            if _finished(c) + c["RUNNING"] < self.target:
                return
            if not said:
                print(f"waiting: the last {c['RUNNING']} trials are running in other workers", flush=True)
                said = True
            time.sleep(self.poll_seconds)
            self._fail_stale_trials()
            c = self.counts()

    def _print_trial(self, frozen, c: dict[str, int]) -> None:
        finished = _finished(c)
        if frozen.state == TrialState.FAIL:
            shown = f"FAIL ({frozen.user_attrs.get('failure', 'see MLflow')})"
        elif frozen.state == TrialState.PRUNED:
            value = frozen.intermediate_values.get(frozen.last_step)
            shown = f"PRUNED at epoch {frozen.last_step}" + (f" ({value:.4f})" if value is not None else "")
        else:
            shown = f"{frozen.state.name} " + " ".join(
                f"{m} {v:.4f}" for (m, _), v in zip(self.sweep.objectives, frozen.values or []))
        rate = (time.perf_counter() - self._t0) / max(1, finished - self._started)
        eta = rate * max(0, self.target - finished)
        print(f"trial {frozen.number}: {shown} | {finished}/{self.target} done ({c['COMPLETE']} complete, "
              f"{c['PRUNED']} pruned, {c['FAIL']} failed) | {self.best_text()} | "
              f"ETA {_duration(eta)}", flush=True)

    def _where(self) -> str:
        url = str(self.cfg.storage.get("url") or self.cfg.storage.get("path"))
        if url.startswith("sqlite:///"):
            return str(Path(url[len("sqlite:///"):]).resolve())
        return url.split("@")[-1]  # no credentials on screen

    def best_trials(self) -> list:
        """The best trial (one objective), the Pareto front by number (several); none yet: []."""
        try:
            if len(self.sweep.objectives) == 1:
                return [self.optuna.best_trial]
            return sorted(self.optuna.best_trials, key=lambda t: t.number)
        except ValueError:
            return []

    def best_text(self, best: list | None = None) -> str:
        best = self.best_trials() if best is None else best
        if not best:
            return "no complete trial yet"
        if len(self.sweep.objectives) == 1:
            return f"best {best[0].value:.4f} (trial {best[0].number})"
        return f"{len(best)} trials on the Pareto front"

    def summary(self) -> tuple[dict[str, int], list]:
        """Counts per state and the best trials, read after the study (riding out a cut)."""
        return self.reconnecting(lambda: (self.counts(), self.best_trials()))


def _finished(counts: dict[str, int]) -> int:
    return sum(counts[s.name] for s in COUNTED)


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def open_study(overrides: list[str], name: str) -> Study:
    """An existing study by name, in the storage the overrides select (for status/report)."""
    cfg = compose(overrides)
    storage = make_storage(cfg.storage)
    names = optuna.study.get_all_study_names(storage)
    if name not in names:
        close = difflib.get_close_matches(name, names, n=1)
        where = str(cfg.storage.get("url") or cfg.storage.get("path")).split("@")[-1]
        raise UserError(f"no study '{name}' in {where}. "
                        + (f"Studies there: {', '.join(sorted(names))}." if names else "It holds no study yet.")
                        + (f" Did you mean {close[0]}?" if close else ""))
    summary = optuna.load_study(study_name=name, storage=storage)
    sweep = summary.user_attrs.get("fmnist.sweep")
    if sweep is None:
        raise UserError(f"study '{name}' was not made by fmnist-sweep (no fmnist.sweep attribute)")
    cfg = compose(overrides + [f"sweep={sweep}", f"study.name={name}"])
    return Study(cfg, overrides, check_space=False)
