"""Optuna studies over Hydra-composed runs. A study is one MLflow experiment with one
parent run; every trial is a nested child run (objective.Objective).

Durability is Optuna's: the storage's heartbeats fail the trial of a worker that stopped
beating and its retry callback re-queues the trial's parameters (storage.py). This module
adds what a worker alone can tell: after a lost connection it re-queues the trial it was
running, and on start it retries at once the trials of dead processes on its own host."""

from __future__ import annotations

import difflib
import logging
import math
import shlex
import sys
import time

import optuna
from omegaconf import DictConfig
from optuna.trial import TrialState

from .config import compose
from .errors import UserError, hold_stops, release_stops, stop_behind, stop_name, stops_deferred
from .objective import Objective, TrialFailed
from .recovery import Recovery
from .storage import describe, make_storage, sqlite_path
from .sweep import load_sweep, make_pruner, make_sampler
from .tracking import Tracker

COUNTED = (TrialState.COMPLETE, TrialState.PRUNED)  # what fills a study's n_trials budget


def _not_a_trial_failure(entry: logging.LogRecord) -> bool:
    """Optuna logs every failed trial with its traceback; the study prints its own line."""
    return "failed with" not in entry.getMessage()


class _Stderr(logging.StreamHandler):
    """Writes to sys.stderr as it is when a record comes, not as it was at import."""

    def emit(self, entry: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(entry)


optuna.logging.set_verbosity(optuna.logging.WARNING)
optuna.logging.disable_default_handler()
_handler = _Stderr()
_handler.addFilter(_not_a_trial_failure)
logging.getLogger("optuna").addHandler(_handler)


def _base_overrides(overrides: list[str]) -> list[str]:
    """The user's command line minus what selects or sizes the study: with
    ``sweep=null`` appended it re-runs a single trial."""
    drop = ("sweep=", "study.")
    return [o for o in overrides if not o.lstrip("+~").startswith(drop)]


class WorkerStudy(optuna.Study):
    """Optuna's study with an ask that a stop signal does not cut: the trial it makes (or takes
    from the queue) reaches ``asked`` (the worker's recovery), and a stop that arrives from then
    until the objective's first line (Optuna starts the trial's heartbeat thread between) is raised
    there (Objective: release_stops), so the trial is marked interrupted, failed and re-queued at
    once, never left running with no owner or failed unmarked by Optuna's own handler."""

    def asked(self, trial: optuna.Trial) -> None:
        """Told each trial this process's ask hands out."""

    def ask(self, fixed_distributions=None) -> optuna.Trial:
        with stops_deferred():
            trial = super().ask(fixed_distributions)
            self.asked(trial)
            hold_stops()
        return trial


class Study:
    """An Optuna study bound to its sweep, its storage and its MLflow parent run.
    ``read_only`` (status, report, compare) writes nothing to the storage or to MLflow."""

    def __init__(self, cfg: DictConfig, overrides: list[str], fork: bool = False, read_only: bool = False):
        self.cfg, self.sweep, self.base = cfg, load_sweep(cfg.sweep), _base_overrides(overrides)
        self.name = cfg.study.name or self.sweep.name
        if fork:
            self.name = f"{self.name}-{self.sweep.fingerprint[:8]}"
        self.n_trials = self.target = cfg.study.n_trials or self.sweep.n_trials
        self.storage = make_storage(cfg.storage)
        sampler, pruner = make_sampler(self.sweep, cfg.seed), make_pruner(self.sweep, cfg.trainer.epochs)
        if not read_only:  # (Optuna makes the study if it is new; this process then opens it as a WorkerStudy)
            optuna.create_study(study_name=self.name, storage=self.storage, load_if_exists=True,
                                directions=[d for _, d in self.sweep.objectives])
        self.optuna = WorkerStudy(self.name, self.storage, sampler, pruner)
        if not read_only:
            self._first_time_or_same_space()
        self.tracker = Tracker(cfg.tracking.uri, self.name, cfg.tracking.artifact_root, create=not read_only)
        self.parent_run_id = self.tracker.parent_run(self.name, None if read_only else self._parent_spec())
        self.recovery = Recovery(self.optuna, self.storage, cfg.storage, self.tracker, self.parent_run_id)
        self.reconnecting = self.recovery.reconnecting
        self.optuna.asked = self.recovery.started
        self.objective = Objective(cfg, self.sweep, self.base, self.optuna, self.tracker, self.parent_run_id,
                                   self.recovery)

    def _first_time_or_same_space(self) -> None:
        """A new study records its sweep and enqueues its starting points; an existing one
        must have been made with the same search space and objectives."""
        attrs = self.optuna.user_attrs
        if "fmnist.space" not in attrs:
            self.optuna.set_user_attr("fmnist.space", self.sweep.fingerprint)
            self.optuna.set_user_attr("fmnist.sweep", str(self.cfg.sweep))  # a name, or a sweep file's path
            self.optuna.set_user_attr("fmnist.params", self.sweep.space.text)
            self.optuna.set_user_attr("fmnist.objectives", self.sweep.objectives)
            for params in self.sweep.enqueue:
                self.optuna.enqueue_trial(dict(params), skip_if_exists=True)
        elif attrs["fmnist.space"] != self.sweep.fingerprint:
            raise UserError(f"study '{self.name}' was created with another search space or objective "
                            f"(sweeps/{self.sweep.name}.yaml changed since). Run with --fork to start a new "
                            f"study '{self.name}-{self.sweep.fingerprint[:8]}', or set study.name=NEW.")

    def _parent_spec(self) -> dict:
        """Name, params and tags of the study's MLflow parent run, made by its first worker."""
        command = "python -m fmnist_sweep " + shlex.join(self.base + [f"sweep={self.sweep.name}"])
        return {"name": f"study {self.name}",
                "params": {"sweep": self.sweep.name, "n_trials": self.n_trials,
                           **{f"space.{k}": v for k, v in self.sweep.space.text.items()}},
                "tags": {"fmnist.command": command,
                         "optuna.directions": ",".join(d for _, d in self.sweep.objectives),
                         "optuna.objectives": ",".join(m for m, _ in self.sweep.objectives)}}

    # --- the loop ------------------------------------------------------------------------------
    def optimize(self, more: int | None = None) -> None:
        """Run trials until the study holds its budget of COMPLETE+PRUNED trials.

        Many workers may run this on one storage: each stops when, after a trial, the budget
        is met (Optuna's MaxTrialsCallback) or ``trainer.deadline`` has passed, so a study of N workers may end with up to N-1
        trials more than its budget (the ones running when it was met)."""
        done = self.reconnecting(self.finished)
        self.target = self.n_trials if more is None else done + more
        if done >= self.target:
            print(f"study {self.name}: {done} of {self.target} trials already done; --more N adds trials")
            return
        print(f"study {self.name}: {done} of {self.target} trials done, {self.target - done} to run "
              f"(storage {describe(self.cfg.storage)}, MLflow experiment '{self.name}', {self.objective.host} "
              f"{self.objective.device})", flush=True)
        self._failures = 0
        self._max_failures = self.sweep.max_failures or max(3, self.target - done)
        callbacks = [self._after_trial, Progress(self, done, self.target),
                     optuna.study.MaxTrialsCallback(self.target, states=COUNTED)]
        while True:
            try:
                self.recovery.recover()
                self.optuna.optimize(self.objective, callbacks=callbacks, catch=(TrialFailed,),
                                     timeout=_until(self.cfg.trainer.get("deadline")))
                break
            except UserError:
                raise
            except (Exception, KeyboardInterrupt) as e:
                release_stops(raise_owed=False)  # (Optuna's code between ask and the objective raised)
                if (stop := stop_behind(e)) is not None:
                    self.recovery.interrupted(stop_name(stop))
                    raise stop from None
                self.recovery.after_error(e)
        self.reconnecting(self.recovery.settle)
        self.tracker.end(self.parent_run_id, "FINISHED")

    def _after_trial(self, study, frozen) -> None:
        """Optuna callback: the trial's MLflow run takes its final state; failures are counted."""
        self.recovery.finished(frozen.number, frozen.state.name)
        self._failures += frozen.state == TrialState.FAIL
        if self._failures >= self._max_failures:
            print(f"stopping: {self._failures} trials failed in this session (max_failures {self._max_failures})",
                  flush=True)
            study.stop()

    # --- reading the study ------------------------------------------------------------------------
    def counts(self, trials=None) -> dict[str, int]:
        """Trials per state; interrupted ones (Ctrl-C or a stop signal, re-queued) apart from failures."""
        counts = {s.name: 0 for s in TrialState} | {"INTERRUPTED": 0}
        for t in self.optuna.get_trials(deepcopy=False) if trials is None else trials:
            counts["INTERRUPTED" if interrupted(t) else t.state.name] += 1
        return counts

    def finished(self) -> int:
        """COMPLETE + PRUNED trials: what fills the budget."""
        return _finished(self.counts())

    def best_trials(self) -> list:
        """The best trial (one objective), the Pareto front by number (several); none yet: []."""
        try:
            if len(self.sweep.objectives) == 1:
                return [self.optuna.best_trial]
            return sorted(self.optuna.best_trials, key=lambda t: t.number)
        except ValueError:
            return []

    def best_text(self, best: list | None = None) -> str:
        """The best so far, for the per-trial line."""
        best = self.best_trials() if best is None else best
        if not best:
            return "no complete trial yet"
        if len(self.sweep.objectives) == 1:
            return f"best {best[0].value:.4f} (trial {best[0].number})"
        return f"{len(best)} trials on the Pareto front"

    def summary(self) -> tuple[dict[str, int], list]:
        """Counts per state and the best trials, read after the study (riding out a cut)."""
        return self.reconnecting(lambda: (self.counts(), self.best_trials()))


class Progress:
    """Optuna callback: one line per finished trial (its state, the counts, the best so far, ETA)."""

    def __init__(self, study: "Study", started: int, target: int):
        self.study, self.started, self.target, self.t0 = study, started, target, time.perf_counter()

    def __call__(self, _, frozen) -> None:
        c = self.study.counts()
        finished = _finished(c)
        if frozen.state == TrialState.FAIL:
            shown = f"FAIL ({frozen.user_attrs.get('failure', 'see MLflow')})"
        elif frozen.state == TrialState.PRUNED:
            value = frozen.intermediate_values.get(frozen.last_step)
            shown = (f"PRUNED at epoch {frozen.last_step}" + (f" ({value:.4f})" if value is not None else "")
                     if frozen.last_step is not None else "PRUNED before its first epoch")
        else:
            shown = f"{frozen.state.name} " + " ".join(
                f"{m} {v:.4f}" for (m, _), v in zip(self.study.sweep.objectives, frozen.values or []))
        rate = (time.perf_counter() - self.t0) / max(1, finished - self.started)
        eta = rate * max(0, self.target - finished)
        deadline = self.study.cfg.trainer.get("deadline")
        if deadline is not None:  # the deadline ends the study first
            eta = min(eta, _until(deadline))
        print(f"trial {frozen.number}: {shown} | {finished}/{self.target} done ({states(c)}) | "
              f"{self.study.best_text()} | ETA {_duration(eta)}", flush=True)


def interrupted(t) -> bool:
    """A trial stopped by Ctrl-C or a stop signal (by its number: a retry copies the attribute, not the number)."""
    return t.state == TrialState.FAIL and t.user_attrs.get("fmnist.interrupted") == t.number


def _until(deadline) -> float | None:
    """Seconds from now to a Unix-time deadline (none: None): Optuna starts no trial after them."""
    return None if deadline is None else max(0.0, float(deadline) - time.time())


def _finished(counts: dict[str, int]) -> int:
    return sum(counts[s.name] for s in COUNTED)


def states(c: dict[str, int]) -> str:
    """'3 complete, 1 pruned, 0 failed' (and interrupted, running, when there are)."""
    text = f"{c['COMPLETE']} complete, {c['PRUNED']} pruned, {c['FAIL']} failed"
    return text + "".join(f", {c[k]} {k.lower()}" for k in ("INTERRUPTED",) if c[k])


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def open_study(overrides: list[str], name: str) -> Study:
    """An existing study by name, in the storage the overrides select, opened read-only."""
    cfg = compose(overrides)
    url = str(cfg.storage.get("url") or cfg.storage.get("path"))
    path = sqlite_path(url)
    storage = None if path is not None and not path.exists() else make_storage(cfg.storage)
    names = optuna.study.get_all_study_names(storage) if storage is not None else []
    if name not in names:
        close = difflib.get_close_matches(name, names, n=1)
        raise UserError(f"no study '{name}' in {path or url.split('@')[-1]}. "
                        + (f"Studies there: {', '.join(sorted(names))}." if names else "It holds no study yet.")
                        + (f" Did you mean {close[0]}?" if close else ""))
    sweep = optuna.load_study(study_name=name, storage=storage).user_attrs.get("fmnist.sweep")
    if sweep is None:
        raise UserError(f"study '{name}' was not made by fmnist-sweep (no fmnist.sweep attribute)")
    return Study(compose(overrides + [f"sweep={sweep}", f"study.name={name}"]), overrides, read_only=True)
