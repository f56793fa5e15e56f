"""What a worker does when its study storage or a trial's process goes away: it pauses
and reconnects, and fails and re-queues (Optuna's retry callback) the trials no worker
will finish. Optuna's heartbeat check covers the rest: the trials of workers elsewhere
that stopped beating."""

from __future__ import annotations

import os
import socket
import time
from datetime import datetime

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from .errors import UserError
from .storage import connection_error, describe

CUT = "the study storage connection was lost; the trial is re-queued"
DEAD = "its worker stopped (the trial is failed and re-queued)"
INTERRUPTED = "interrupted (Ctrl-C); re-queued for the next run"


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
    """One worker's recovery state for its study: the trial it runs, the one a lost
    connection stopped, and the connections lost since its last finished trial."""

    def __init__(self, study):
        self.study, self.process = study, process_id()
        self.current: int | None = None  # the trial this process is running
        self.cut: int | None = None  # a trial whose objective stopped on a lost connection
        self.taken_over: int | None = None  # a trial of ours another worker's heartbeat check failed
        self.lost = 0

    def recover(self) -> None:
        """Fail and re-queue (Optuna's retry callback, within storage.max_retry) the trials no
        worker will finish (_abandoned); Optuna's heartbeat check fails the trials of workers
        elsewhere a grace period after their last beat."""
        s = self.study
        if getattr(s.storage, "heartbeat_interval", None):
            optuna.storages.fail_stale_trials(s.optuna)
        held = getattr(s.storage, "held", None)
        held = s.storage.get_trial(held).number if held is not None else None
        trials = s.optuna.get_trials(deepcopy=False)
        retried = {RetryHeartbeatStaleTrialCallback.retried_trial_number(t) for t in trials}
        for t in trials:
            if t.number in retried or not self._abandoned(t, held):
                continue
            if t.state == TrialState.RUNNING:
                try:
                    s.optuna.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
                except optuna.exceptions.UpdateFinishedTrialError:
                    continue  # another worker's recovery failed it first, and re-queues it
            s.retry(s.optuna, t)  # a WAITING copy of its parameters and attributes
            self.close_run(t.number, "FAIL", CUT)  # its result never reached the study
        for t in trials:  # a result that reached the storage though the connection broke in its commit
            if t.state.is_finished():
                self.close_run(t.number, t.state.name)
        self.cut = None
        if hasattr(s.storage, "held"):
            s.storage.held = None
        self.end_orphans()

    def _abandoned(self, t, held: int | None) -> bool:
        """A trial no worker will finish: the one a lost connection stopped here (running, or
        failed by it), the waiting trial this worker holds (taken from the queue when the
        connection was lost), one whose process on this host is gone, or one still without an owner a grace period after it started (its worker
        died or was cut off inside Optuna's ask, before the trial reached the objective)."""
        if t.state == TrialState.FAIL:
            return t.number == self.cut
        if t.state != TrialState.RUNNING:
            return False
        if t.number in (held, self.cut) or _is_dead(t.user_attrs.get("process"), self.process):
            return True
        grace = self.study.cfg.storage.get("grace_period")
        return ("process" not in t.user_attrs and grace is not None and t.datetime_start is not None
                and (datetime.now() - t.datetime_start).total_seconds() > grace)

    def settle(self) -> None:
        """At the study's end: a RUNNING trial still without an owner (its worker was cut off
        inside Optuna's ask, so no heartbeat will ever fail it) is waited for until
        storage.grace_period after it started, then failed and re-queued; then end_orphans."""
        s, grace = self.study, self.study.cfg.storage.get("grace_period")
        while grace is not None:
            ownerless = [t for t in s.optuna.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
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

    def close_run(self, number: int, state: str, failure: str | None = None) -> None:
        """The MLflow run this process made for trial ``number``, if it still awaits its trial's
        state, takes that state (and the failure's kind)."""
        s = self.study
        if (run := s.runs.pop(number, None)) is not None:
            s.tracker.log(run, {}, tags={"optuna.state": state, **({"fmnist.failure": failure} if failure else {})})

    def end_orphans(self) -> None:
        """This study's MLflow runs left RUNNING by trials Optuna has finished: ended KILLED."""
        s = self.study
        by_number = {t.number: t.state for t in s.optuna.get_trials(deepcopy=False)}
        s.tracker.end_orphans(s.name, by_number, DEAD)

    def interrupted(self) -> None:
        """Ctrl-C: the trial it stopped is re-queued and marked interrupted; the study's run KILLED."""
        s = self.study
        try:
            number = self.current
            trial = next((t for t in s.optuna.get_trials(deepcopy=False) if t.number == number), None)
            if trial is not None and trial.state in (TrialState.RUNNING, TrialState.FAIL):
                s.optuna.tell(number, state=TrialState.FAIL, skip_if_finished=True)
                s.retry(s.optuna, trial)
                self.close_run(number, "FAIL", INTERRUPTED)
            s.tracker.end(s.parent_run_id, "KILLED")
        except Exception:  # the storage is gone too: the next run's recovery retries the trial
            pass

    def pause(self, e: Exception) -> None:
        """After a lost storage connection: pauses that grow (storage.retry_pause seconds, twice
        that, ... up to five times); the sixth loss in a row ends the worker with one line."""
        s, cut = self.study, connection_error(e)
        if cut is None:
            raise e
        self.lost += 1
        first = str(cut).splitlines()[0] if str(cut) else type(cut).__name__
        if self.lost > 5:
            raise UserError(f"lost the study storage {describe(s.cfg.storage)} {self.lost} times in a row: {first}") from None
        print(f"storage connection lost ({first[:80]}); reconnecting", flush=True)
        time.sleep(s.cfg.storage.get("retry_pause", 2.0) * self.lost)

    def reconnecting(self, fn):
        """``fn()``, again after each lost storage connection (with the loop's pauses)."""
        while True:
            try:
                return fn()
            except Exception as e:
                self.pause(e)
