"""What a worker does when its study storage or a trial's process goes away: it pauses
and reconnects, and fails and re-queues (Optuna's retry callback) the trials no worker
will finish. Optuna's heartbeat check covers the rest: the trials of workers elsewhere
that stopped beating."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from datetime import datetime

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from .errors import StorageLost, UserError
from .storage import connection_error, describe, retry_callback

CUT = "the study storage connection was lost; the trial is re-queued"
DEAD = "its worker stopped (the trial is failed and re-queued)"
TAKEN_OVER = ("failed and re-queued by another worker's heartbeat check while it ran here (no heartbeat "
              "reached the storage for storage.grace_period seconds)")


def process_id() -> str:
    """This process, as other workers on its machine can tell it: host, PID namespace, PID."""
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        namespace = 0
    return f"{socket.gethostname()}:{namespace}:{os.getpid()}"


def _is_dead(process: str | None, me: str) -> bool:
    """Whether ``process`` (a _process_id) is this one or a process gone from this host."""
    if not process:
        return False
    host, namespace, pid = process.rsplit(":", 2)
    if process == me:
        return True
    if [host, namespace] != me.rsplit(":", 2)[:2]:
        return False  # another machine or container: its heartbeat tells
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    return False


class Recovery:
    """One worker's recovery for its study. The study tells it which trial it runs
    (``started``, as Optuna's ask hands it out), which MLflow run awaits a trial's state
    (``opened``), how a trial ended (``finished``), and hands it the errors it meets (``lost``,
    ``after_error``); it asks it to ``recover`` before trials, ``settle`` after them, and to
    stop cleanly (``interrupted``). Recovery reads and writes only the Optuna study, its
    storage and the MLflow tracker it was given, never the Study object."""

    def __init__(self, study: optuna.Study, storage, storage_cfg, tracker, parent_run_id: str | None):
        self.optuna, self.storage, self.storage_cfg = study, storage, storage_cfg
        self.tracker, self.parent_run_id = tracker, parent_run_id
        self.retry = retry_callback(storage_cfg)
        self.process = process_id()
        self.current: optuna.Trial | None = None  # the trial this process is running
        self.cut: int | None = None  # a trial whose objective stopped on a lost connection
        self.taken_over: int | None = None  # a trial of ours another worker's heartbeat check failed
        self.losses = 0  # connections lost since this worker's last finished trial
        self.runs: dict[int, str] = {}  # trial number -> this process's MLflow run, until it has the trial's state

    # --- what the study tells it ------------------------------------------------------------------
    def started(self, trial: optuna.Trial) -> None:
        """This process runs ``trial`` now."""
        self.current = trial

    def stopping(self) -> None:
        """A stop (Ctrl-C or a stop signal) ends the running trial: it is marked so, to be counted
        apart from failures (by number: a retry copies the mark)."""
        with contextlib.suppress(Exception):  # (finished already, or the storage is gone)
            self.current.set_user_attr("fmnist.interrupted", self.current.number)

    def opened(self, number: int, run_id: str) -> None:
        """Trial ``number``'s MLflow run, made by this process, awaits the trial's final state."""
        self.runs[number] = run_id

    def finished(self, number: int, state: str) -> None:
        """Optuna finished trial ``number`` in ``state``: its run takes the state; the losses restart."""
        self.losses = 0
        self.close_run(number, state)

    def lost(self, number: int, e: Exception) -> StorageLost:
        """What stops trial ``number`` that lost its storage (a cut) or that another worker's
        heartbeat check failed (taken over): noted for after_error and recover."""
        if isinstance(e, optuna.exceptions.UpdateFinishedTrialError):
            self.taken_over = number
            return StorageLost(TAKEN_OVER)
        self.cut = number
        return StorageLost(CUT)

    def after_error(self, e: Exception) -> None:
        """An error that ended the study loop: a trial taken over elsewhere is passed over with
        one line (Optuna cannot tell it failed elsewhere); a lost connection is paused for
        (pause); anything else is raised."""
        if self.taken_over is not None:
            print(f"trial {self.taken_over}: {TAKEN_OVER}; going on with the next trial", flush=True)
            self.taken_over = None
            return
        self.pause(e)

    # --- what the study asks of it ------------------------------------------------------------------
    def recover(self) -> None:
        """Fail and re-queue (Optuna's retry callback, within storage.max_retry) the trials no
        worker will finish (_abandoned); Optuna's heartbeat check fails the trials of workers
        elsewhere a grace period after their last beat."""
        if getattr(self.storage, "heartbeat_interval", None):
            optuna.storages.fail_stale_trials(self.optuna)
        held = getattr(self.storage, "held", None)
        held = self.storage.get_trial(held).number if held is not None else None
        trials = self.optuna.get_trials(deepcopy=False)
        retried = {RetryHeartbeatStaleTrialCallback.retried_trial_number(t) for t in trials}
        for t in trials:
            if t.number in retried or not self._abandoned(t, held):
                continue
            if t.state == TrialState.RUNNING:
                try:
                    self.optuna.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
                except optuna.exceptions.UpdateFinishedTrialError:
                    continue  # another worker's recovery failed it first, and re-queues it
            self.retry(self.optuna, t)  # a WAITING copy of its parameters and attributes
            self.close_run(t.number, "FAIL", CUT)  # its result never reached the study
        for t in trials:  # a result that reached the storage though the connection broke in its commit
            if t.state.is_finished():
                self.close_run(t.number, t.state.name)
        self.cut = None
        if hasattr(self.storage, "held"):
            self.storage.held = None
        self.end_orphans()

    def _abandoned(self, t, held: int | None) -> bool:
        """A trial no worker will finish: the one a lost connection stopped here (running, or
        failed by it), the waiting trial this worker holds (taken from the queue when the
        connection was lost), one whose process on this host is gone, or one still without an
        owner a grace period after it started (its worker died or was cut off inside Optuna's
        ask, before the trial reached the objective)."""
        if t.state == TrialState.FAIL:
            return t.number == self.cut
        if t.state != TrialState.RUNNING:
            return False
        if t.number in (held, self.cut) or _is_dead(t.user_attrs.get("process"), self.process):
            return True
        grace = self.storage_cfg.get("grace_period")
        return ("process" not in t.user_attrs and grace is not None and t.datetime_start is not None
                and (datetime.now() - t.datetime_start).total_seconds() > grace)

    def settle(self) -> None:
        """At the study's end: a RUNNING trial still without an owner (its worker was cut off
        inside Optuna's ask, so no heartbeat will ever fail it) is waited for until
        storage.grace_period after it started, then failed and re-queued; then end_orphans."""
        grace = self.storage_cfg.get("grace_period")
        while grace is not None:
            ownerless = [t for t in self.optuna.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                         if "process" not in t.user_attrs and t.datetime_start is not None]
            if not ownerless:
                break
            left = max(grace - (datetime.now() - t.datetime_start).total_seconds() for t in ownerless)
            if left < 0:
                self.recover()
                break
            print(f"trial {ownerless[0].number}: no worker recorded (cut off while it was created); "
                  f"failing it in {left:.0f} s unless one takes it", flush=True)
            time.sleep(min(left, 10) + 0.5)
        self.end_orphans()

    def close_run(self, number: int, state: str, failure: str | None = None, status: str | None = None) -> None:
        """The MLflow run this process made for trial ``number``, if it still awaits its trial's
        state, takes that state (and the failure's kind; and ``status``, where given, as its own)."""
        if (run := self.runs.pop(number, None)) is not None:
            self.tracker.log(run, {}, tags={"optuna.state": state, **({"fmnist.failure": failure} if failure else {})})
            if status is not None:
                self.tracker.end(run, status)

    def end_orphans(self) -> None:
        """This study's MLflow runs left RUNNING by trials Optuna has finished: ended KILLED."""
        by_number = {t.number: t.state for t in self.optuna.get_trials(deepcopy=False)}
        self.tracker.end_orphans(self.optuna.study_name, by_number, DEAD)

    def interrupted(self, why: str = "Ctrl-C") -> None:
        """Ctrl-C or a stop signal: the trial it stopped is re-queued and marked interrupted; the
        study's run KILLED."""
        try:
            trial = None
            if self.current is not None:
                self.stopping()  # (a stop during Optuna's tell leaves the trial RUNNING and unmarked)
                trial = next((t for t in self.optuna.get_trials(deepcopy=False) if t.number == self.current.number),
                             None)
            if trial is not None and trial.state in (TrialState.RUNNING, TrialState.FAIL):
                number = trial.number
                self.optuna.tell(number, state=TrialState.FAIL, skip_if_finished=True)
                self.retry(self.optuna, trial)
                # (a run that had ended training: its result is not the trial's, which runs again)
                self.close_run(number, "FAIL", f"interrupted ({why}); re-queued for the next run", "KILLED")
            elif trial is not None:  # the stop came once its final state had reached the storage
                self.close_run(trial.number, trial.state.name)
            self.tracker.end(self.parent_run_id, "KILLED")
        except Exception:  # the storage is gone too: the next run's recovery retries the trial
            pass

    def pause(self, e: Exception) -> None:
        """After a lost storage connection: pauses that grow (storage.retry_pause seconds, twice
        that, ... up to five times); the sixth loss in a row ends the worker with one line."""
        cut = connection_error(e)
        if cut is None:
            raise e
        self.losses += 1
        first = str(cut).splitlines()[0] if str(cut) else type(cut).__name__
        if self.losses > 5:
            raise UserError(f"lost the study storage {describe(self.storage_cfg)} {self.losses} times in a row: "
                            f"{first}") from None
        print(f"storage connection lost ({first[:80]}); reconnecting", flush=True)
        time.sleep(self.storage_cfg.get("retry_pause", 2.0) * self.losses)

    def reconnecting(self, fn):
        """``fn()``, again after each lost storage connection (with the loop's pauses)."""
        while True:
            try:
                return fn()
            except Exception as e:
                self.pause(e)
