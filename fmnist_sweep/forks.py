"""Child processes that start without importing torch, MLflow and Optuna again: a
multiprocessing forkserver that imports what a run needs once and forks each child
from there. The local workers of `workers` and the side-by-side speed measurement and
final models of +experiment=best start this way.

A forkserver child is a fork of a process that imported, and never ran, torch: no
training threads or locks are copied (the reason "fork" from a running process is not
safe), and nothing it imported is paid again."""

from __future__ import annotations

import multiprocessing
import os
import sys
import threading
import time

# What a run's process imports by the end of its first run: before its first batch (MLflow's
# client and the embedded store are imported when the study or run opens them; torch._dynamo
# on the first optimizer step). The artifacts' plotting libraries are left to the children
# that draw them.
PRELOAD = ["fmnist_sweep.study", "fmnist_sweep.record", "torch._dynamo", "mlflow.tracking",
           "mlflow.store.tracking.sqlalchemy_store"]


def context():
    """The multiprocessing context whose processes fork from the pre-imported server (started
    on the first child, then shared by every child of this process)."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def warm() -> None:
    """Start the server now (its imports, once per process), so that a child started later
    starts as the next ones will: a fork."""
    p = context().Process(target=os.getpid)
    p.start()
    p.join()


def start() -> None:
    """warm() in the background, so that the server imports while this process does."""
    threading.Thread(target=warm, daemon=True, name="forkserver-start").start()


def cli_child(argv: list[str], env: dict, out, err=None) -> None:
    """`python -m fmnist_sweep ARGV` in a forked child: ``env`` its environment (the server's
    is the one its parent had when the server started), its output (C libraries' too) into
    the socket ``out`` (its standard error into ``err`` where given), its exit code as the process's."""
    from . import cli
    from .errors import stop_on_signals

    cli.STARTED = time.time()  # the child's own start, not its module's import (possibly in the server)
    os.environ.clear()
    os.environ.update(env)
    err = err or out
    os.dup2(out.fileno(), 1)
    os.dup2(err.fileno(), 2)
    for sock in {out, err}:
        sock.close()
    stop_on_signals()
    cli.leave(cli.main(argv))
