"""The exceptions that are not a traceback: a user's error (its message names the fix), a lost
storage, and a stop signal taken as a clean stop."""

import signal


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


def stop_on_signals() -> None:
    """SIGTERM and SIGHUP (what schedulers, `docker stop`, `kill` and a closed terminal send)
    raise Stopped in the main thread; a second one during the clean-up is ignored, so
    only SIGKILL cuts it short."""
    def stop(signum, _frame):
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        raise Stopped(signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) is not signal.SIG_IGN:  # (nohup ignores SIGHUP: it stays ignored)
            signal.signal(sig, stop)


def stop_signal(e: KeyboardInterrupt) -> int:
    """The signal that stopped the process: SIGINT for Ctrl-C."""
    return e.signum if isinstance(e, Stopped) else signal.SIGINT


def stop_name(e: KeyboardInterrupt) -> str:
    """How a user names what stopped the process: "Ctrl-C", "SIGTERM", "SIGHUP"."""
    return e.name if isinstance(e, Stopped) else "Ctrl-C"
