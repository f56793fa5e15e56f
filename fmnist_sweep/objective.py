"""One trial of a study: suggest from the sweep, compose the trial's config with Hydra,
train and record it (record.run) as a child of the study's MLflow parent run, or reuse a
finished twin's result. Optuna calls an Objective once per trial."""

from __future__ import annotations

import contextlib
import os
import shlex
import socket

import optuna
from omegaconf import DictConfig
from optuna.trial import TrialState

from . import checkpoints, cores, hardware, record
from .config import compose, config_fingerprint, flat_keys
from .errors import release_stops, stop_behind, stops_deferred
from .recovery import Recovery
from .storage import connection_errors
from .sweep import Sweep
from .tracking import Tracker
from .workers import CORES


class TrialFailed(Exception):
    """A trial whose run failed (diverged, crashed): the study goes on."""


class Objective:
    """What Optuna optimizes: a trial's objective values. ``base`` is the user's command line
    without the study's own keys; the trial's run reports each epoch to Optuna (pruning)
    and tells ``recovery`` which trial it runs and which MLflow run awaits its state."""

    def __init__(self, cfg: DictConfig, sweep: Sweep, base: list[str], study: optuna.Study, tracker: Tracker,
                 parent_run_id: str | None, recovery: Recovery):
        self.cfg, self.sweep, self.base, self.optuna = cfg, sweep, base, study
        self.tracker, self.parent_run_id, self.recovery = tracker, parent_run_id, recovery
        self.host = socket.gethostname()
        self.device = hardware.device_label(cfg.trainer.device)
        self._keys_cache: dict[tuple[str, ...], frozenset[str]] = {}
        # A worker started by hand shares the machine's cores with the others (cores.py).
        self.cores = cores.for_worker(cfg, pinned=bool(os.environ.get(CORES)))

    def __call__(self, trial: optuna.Trial):
        """One trial: its values; a lost storage connection or a trial taken over by another
        worker is not the trial's failure (StorageLost: the worker re-queues it), and a stop
        (or an error raised as one unwound) marks the trial interrupted."""
        try:
            release_stops()  # a stop since Optuna's ask (WorkerStudy) is this trial's, raised here
            with self.cores.trial() if self.cores is not None else contextlib.nullcontext() as got:
                if got:
                    trial.set_user_attr("cores", len(got))
                return self._trial(trial)
        except BaseException as e:
            if stop_behind(e) is not None:  # a stop, or an error raised as a stop unwound: both the stop's
                self.recovery.stopping()
                raise
            if isinstance(e, (*connection_errors(), optuna.exceptions.UpdateFinishedTrialError)):
                raise self.recovery.lost(trial.number, e) from e
            raise

    def _trial(self, trial: optuna.Trial):
        """Suggest, compose and train (or reuse a twin's result); the trial's objective values."""
        trial.set_user_attr("worker", f"{self.host}:{os.getpid()}")
        trial.set_user_attr("process", self.recovery.process)
        trial.set_user_attr("host", self.host)
        trial.set_user_attr("device", self.device)
        suggested = self.sweep.space.suggest(trial, self._keys_for)
        chosen = {o.split("=", 1)[0] for o in suggested}
        line = [o for o in self.base if o.lstrip("+~").split("=", 1)[0] not in chosen] + ["sweep=null"] + suggested
        cfg = compose(line)
        cfg.trainer.progress = False  # the study prints one line per trial instead
        fp = config_fingerprint(cfg)
        trial.set_user_attr("overrides", shlex.join(line))
        trial.set_user_attr("fingerprint", fp)
        tags = {"optuna.study": self.optuna.study_name, "optuna.trial_number": trial.number, "fmnist.host": self.host}
        twin = next((t for t in self.optuna.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                     if t.user_attrs.get("fingerprint") == fp), None)
        if twin is not None:
            return self._reuse(trial, twin, line, tags)
        result = record.run(cfg, line, report=self._reporter(trial), parent_run_id=self.parent_run_id, tags=tags,
                            tracker=self.tracker, name=f"trial {trial.number}", log_model=self._log_model(),
                            checkpoint=self.cfg.study.get("checkpoints", "off"), resume=self._resumable(trial, fp),
                            opened=lambda run_id: self.recovery.opened(trial.number, run_id))
        trial.set_user_attr("mlflow_run_id", result.run_id)
        if result.status == "KILLED":
            raise optuna.TrialPruned(result.message)
        if result.status != "FINISHED":
            trial.set_user_attr("failure", result.message)
            raise TrialFailed(result.message)
        values = [result.metrics[m] for m, _ in self.sweep.objectives]
        return values[0] if len(values) == 1 else values

    def _reporter(self, trial: optuna.Trial):
        """record.run's per-epoch hook: report the objective to Optuna, say whether to prune."""
        metric = self.sweep.objectives[0][0]

        def report(epoch: int, metrics: dict) -> bool:
            if len(self.sweep.objectives) > 1 or metric not in metrics:
                return False
            try:
                with stops_deferred():  # (a read cut half-way leaves SQLAlchemy's traceback on the way out)
                    trial.report(metrics[metric], epoch)
                    pruned = trial.should_prune()
                return pruned
            except (*connection_errors(), optuna.exceptions.UpdateFinishedTrialError) as e:
                raise self.recovery.lost(trial.number, e) from e  # record.run then ends its run KILLED
        return report

    def _resumable(self, trial: optuna.Trial, fingerprint: str) -> tuple[str, dict] | None:
        """A retried trial's way back: its predecessors' newest checkpoint of the same
        configuration (checkpoints.py), whose epochs are reported to this trial as they were."""
        if self.cfg.study.get("checkpoints", "off") == "off":
            return None
        frozen = next(t for t in self.optuna.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                      if t.number == trial.number)  # (this trial runs: the running ones suffice)
        numbers = optuna.storages.RetryHeartbeatStaleTrialCallback.retry_history(frozen)
        found = checkpoints.latest(self.tracker, checkpoints.of_trials(self.optuna.study_name, numbers),
                                   fingerprint) if numbers else None
        metric = self.sweep.objectives[0][0]
        for h in found[1]["history"] if found is not None and len(self.sweep.objectives) == 1 else []:
            if metric in h:
                trial.report(h[metric], h["epoch"])
        return found

    def _log_model(self):
        """Whether a finished trial logs its MLflow Model: all, none, or (tracking.log_models=best)
        one whose objective beats every COMPLETE trial's so far (several objectives: all)."""
        which = self.cfg.tracking.get("log_models", "best")
        if which == "none":
            return False
        if which == "all" or len(self.sweep.objectives) > 1:
            return True
        metric, direction = self.sweep.objectives[0]

        def best_so_far(result) -> bool:
            try:
                best = self.optuna.best_value
            except ValueError:  # no COMPLETE trial yet
                return True
            value = result.metrics.get(metric)
            return value is not None and (value > best if direction == "maximize" else value < best)
        return best_so_far

    def _reuse(self, trial, twin, line, tags):
        """Same composed config as a finished trial: take its result instead of retraining."""
        trial.set_user_attr("duplicate_of", twin.number)
        run_id = self.tracker.start(f"trial {trial.number}", {}, {
            **tags, "fmnist.duplicate_of_trial": twin.number, "fmnist.overrides": shlex.join(line),
            "fmnist.duplicate_of_run": twin.user_attrs.get("mlflow_run_id", "")}, parent_run_id=self.parent_run_id)
        self.recovery.opened(trial.number, run_id)
        self.tracker.log(run_id, {m: v for (m, _), v in zip(self.sweep.objectives, twin.values)})
        self.tracker.end(run_id, "FINISHED")
        trial.set_user_attr("mlflow_run_id", run_id)
        return twin.values[0] if len(twin.values) == 1 else twin.values

    def _keys_for(self, overrides: list[str]) -> frozenset[str]:
        """The config keys present with these group choices: listed once per distinct choice."""
        key = tuple(overrides)
        if key not in self._keys_cache:
            self._keys_cache[key] = frozenset(flat_keys(compose(self.base + ["sweep=null"] + overrides)))
        return self._keys_cache[key]
