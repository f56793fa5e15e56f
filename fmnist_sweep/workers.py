"""Start N local workers of one study, each on its own GPU slot or CPU cores."""

from __future__ import annotations

import os
import socket
import sys
import threading

from .errors import UserError, stop_signal

CORES = "FMNIST_CORES"  # the CPU cores a worker started by launch() runs on


def pin_to_cores() -> None:
    """A worker started by launch() keeps to its cores: set here, in the worker itself,
    since a pre-exec hook in a process that runs threads can deadlock."""
    if os.environ.get(CORES):
        os.sched_setaffinity(0, [int(c) for c in os.environ[CORES].split(",")])


def default_workers(per_gpu: int, gpus: int, cores: list[int]) -> int:
    """Without -n: every GPU slot, else one 1-thread worker per core (small convolutions
    scale poorly across threads: bench/workers.py measures it)."""
    return gpus * per_gpu if gpus else len(cores)


def layout(n: int, per_gpu: int, gpus: int, cores: list[int]) -> list[dict]:
    """Per worker: the environment and CPU cores it gets.

    GPUs: worker i uses GPU i // per_gpu (one GPU each by default), and an equal
    share of the cores for its threads. CPU only: the cores are split evenly so that
    workers x threads = cores; more workers than cores get one thread each, pinned
    round-robin (never several threads each: oversubscribed OpenMP collapses throughput)."""
    if gpus:
        if n > gpus * per_gpu:
            raise UserError(f"{n} workers need {-(-n // per_gpu)} GPUs at {per_gpu} per GPU; this machine has "
                            f"{gpus}. Use -n {gpus * per_gpu} or --per-gpu {-(-n // gpus)}.")
    elif n > len(cores):
        print(f"warning: {n} workers on {len(cores)} cores: each gets 1 thread and they take turns "
              "(worth it only when trials wait on I/O more than they compute)")
    share = max(1, len(cores) // n)
    slots = []
    for i in range(n):
        mine = cores[i * share:(i + 1) * share] or [cores[i % len(cores)]]
        env = {"OMP_NUM_THREADS": str(len(mine)), "MKL_NUM_THREADS": str(len(mine)),
               "FMNIST_WORKER": str(i), CORES: ",".join(map(str, mine))}
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = str(i // per_gpu)
        slots.append({"env": env, "cores": mine})
    return slots


def _pump(sock, prefix: str) -> None:
    for line in sock.makefile("r", encoding="utf-8", errors="replace"):
        sys.stdout.write(prefix + line)
        sys.stdout.flush()


def _start(argv: list[str], env: dict, prefix: str):
    """A worker process forked from the pre-imported server (forks.cli_child), its output
    copied to ours line by line after ``prefix``."""
    from . import forks

    mine, theirs = socket.socketpair()
    p = forks.context().Process(target=forks.cli_child, args=(argv, env, theirs))
    p.start()
    theirs.close()
    p.pump = threading.Thread(target=_pump, args=(mine, prefix), daemon=True)
    p.pump.start()
    return p


def launch(cfg, overrides: list[str], n: int | None, per_gpu: int, more: int | None) -> int:
    """Create the study once (its storage schema, MLflow experiment and parent run:
    racing processes on a fresh store corrupt it), then run the workers to its end."""
    import torch

    import time

    from . import study_report
    from .study import Study

    t0 = time.perf_counter()
    study = Study(cfg, overrides)
    target = study.n_trials if more is None else study.finished() + more
    gpus = torch.cuda.device_count() if cfg.trainer.device != "cpu" else 0
    cores = sorted(os.sched_getaffinity(0))
    n = n or default_workers(per_gpu, gpus, cores)
    slots = layout(n, per_gpu, gpus, cores)
    print(f"study {study.name}: {n} workers to {target} trials; "
          + ", ".join(f"w{i}: " + (f"GPU {s['env']['CUDA_VISIBLE_DEVICES']}, " if gpus else "")
                      + f"cores {s['cores']}" for i, s in enumerate(slots)), flush=True)
    argv = [*[o for o in overrides if not o.startswith("study.n_trials=")], f"study.n_trials={target}"]
    # each pins itself to its cores (pin_to_cores)
    procs = [_start(argv, {**os.environ, **slot["env"]}, f"[w{i}] ") for i, slot in enumerate(slots)]
    try:
        for p in procs:
            p.join()
            p.pump.join(5)  # its last lines before our own
    except KeyboardInterrupt as e:  # Ctrl-C or a stop signal: the same to every worker
        for p in procs:
            if p.exitcode is None:
                os.kill(p.pid, stop_signal(e))
        for p in procs:
            p.join()
        raise
    study.reconnecting(lambda: study_report.publish(study))
    from .cli import study_outcome

    codes = [p.exitcode for p in procs]  # as a shell reports them (-N: killed by signal N)
    study_outcome(study, t0, f"; worker exit codes {codes}")
    return max(codes)
