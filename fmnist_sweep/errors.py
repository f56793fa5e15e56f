"""The exceptions that are not a traceback: a user's error (its message names the fix), a lost
storage, and a stop signal taken as a clean stop."""

import signal
import sys
import threading
from contextlib import contextmanager


class UserError(Exception):
    """A problem the user can fix; its message names the problem and the fix."""


class StorageLost(Exception):
    """The study storage connection was cut during a trial: not the trial's failure.
    Training stops (its MLflow run KILLED) and the study's worker reconnects and re-queues it."""


class Stopped(KeyboardInterrupt):
    """A stop signal (SIGTERM, SIGHUP) the process takes as a clean stop, like Ctrl-C: a
    KeyboardInterrupt, so Optuna fails the running trial and our code re-queues it."""

    def __init__(self, signum: int):
        self.signum = signum
        self.name = signal.Signals(signum).name
        super().__init__(self.name)


_pending: int | None = None  # the stop signal taken, until raise_if_stopped raises it again
_deferring = 0  # stops_deferred blocks in progress
_owed: int | None = None  # a stop signal that arrived inside one, raised at its end
_held = False  # a hold_stops span in progress (it counts as one stops_deferred block)


def stop_on_signals() -> None:
    """SIGTERM and SIGHUP (what schedulers, `docker stop`, `kill` and a closed terminal send)
    raise Stopped in the main thread; a second one during the clean-up is ignored, so
    only SIGKILL cuts it short. Ctrl-C raises KeyboardInterrupt as Python's own handler does.
    Each is also kept for raise_if_stopped; inside stops_deferred it waits for the block's end."""
    def stop(signum, _frame):
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        if not _take(signum):
            raise Stopped(signum)

    def interrupt(signum, frame):
        if not _take(signum):
            signal.default_int_handler(signum, frame)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) is not signal.SIG_IGN:  # (nohup ignores SIGHUP: it stays ignored)
            signal.signal(sig, stop)
    sys.unraisablehook = _quiet_stops
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # (a background job's stays ignored)
        signal.signal(signal.SIGINT, interrupt)


def _take(signum: int) -> bool:
    """Keep a stop signal for raise_if_stopped; True where a stops_deferred block is in progress
    (the stop is then owed to the block's end, not raised now)."""
    global _pending, _owed
    _pending = signum
    if _deferring:
        _owed = signum
    return bool(_deferring)


@contextmanager
def stops_deferred():
    """A block that a stop signal does not cut: one that arrives inside it is raised at its end
    (or, where the block raised, by the next such block or raise_if_stopped). Writes to a store
    run in one: a write cut half-way leaves its SQLite transaction to a clean-up that runs while
    the exception unwinds, and the process's own closing writes (its run marked KILLED) wait
    on that file's lock. Only the main thread's blocks defer: signal handlers run in it alone, and
    a stop owed to another thread's block would end that thread instead."""
    global _deferring
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
    _raise_owed()


def hold_stops() -> None:
    """Defer stops from here until release_stops, as a stops_deferred block would: for a span that
    begins in one function and ends in another, with a library's code between (Optuna's, from its
    ask to the objective it calls). Main thread only, as stops_deferred."""
    global _deferring, _held
    if threading.current_thread() is threading.main_thread() and not _held:
        _deferring, _held = _deferring + 1, True


def release_stops(raise_owed: bool = True) -> None:
    """End the hold_stops span, if one is in progress: a stop that arrived inside it is raised
    here (``raise_owed``), or else by the next stops_deferred block or raise_if_stopped."""
    global _deferring, _held
    if not _held or threading.current_thread() is not threading.main_thread():
        return
    _deferring, _held = _deferring - 1, False
    if raise_owed:
        _raise_owed()


def _raise_owed() -> None:
    """Raise the stop owed to the deferring blocks and spans, once none is left in progress."""
    global _owed
    if not _deferring and _owed is not None:
        signum, _owed = _owed, None
        raise _stop(signum)


def _stop(signum: int) -> KeyboardInterrupt:
    """The exception a stop signal raises: KeyboardInterrupt for Ctrl-C, else Stopped."""
    return Stopped(signum) if signum != signal.SIGINT else KeyboardInterrupt()


def _quiet_stops(unraisable) -> None:
    """A stop dropped where Python cannot raise it (see raise_if_stopped) prints nothing: the
    stop itself is kept and raised again; any other such exception is printed as Python does."""
    if not isinstance(unraisable.exc_value, KeyboardInterrupt):
        sys.__unraisablehook__(unraisable)


def raise_if_stopped() -> None:
    """Raise once more a stop that a signal raised where Python drops exceptions: a signal that
    lands while the interpreter runs a finalizer (a __del__, or a weakref callback such as
    SQLAlchemy's during garbage collection) has its exception printed as "Exception ignored" and
    the process goes on. The training and evaluation loops call this every batch; where the first
    exception was not dropped, the process is already stopping and never gets here."""
    global _pending
    if _pending is not None:
        signum, _pending = _pending, None
        raise _stop(signum)


def behind(e: BaseException | None, kinds) -> BaseException | None:
    """The exception of ``kinds`` behind ``e``, if any: ``e`` itself, its cause, or the exception
    being handled when it was raised, and so on down the chain."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, kinds):
            return e
        e = e.__cause__ or e.__context__
    return None


def stop_behind(e: BaseException) -> KeyboardInterrupt | None:
    """The stop (Ctrl-C or a stop signal) behind ``e``. A stop that lands inside Optuna's tell
    (the trial's final storage write) surfaces as Optuna's own error from its clean-up (an
    UnboundLocalError), with the stop as its context."""
    return behind(e, KeyboardInterrupt)


def stop_signal(e: KeyboardInterrupt) -> int:
    """The signal that stopped the process: SIGINT for Ctrl-C."""
    return e.signum if isinstance(e, Stopped) else signal.SIGINT


def stop_name(e: KeyboardInterrupt) -> str:
    """How a user names what stopped the process: "Ctrl-C", "SIGTERM", "SIGHUP"."""
    return e.name if isinstance(e, Stopped) else "Ctrl-C"
