"""Trials per hour of one fixed small study with 1, 2 and 4 local CPU workers.

Each layout runs the same study from scratch (fresh stores) through
`python -m fmnist_sweep workers -n N`, so start-up, storage and MLflow costs are in.

    python bench/workers.py                        # 1, 2, 4 workers, SQLite + local MLflow
    python bench/workers.py --quick                # 2 trials, 1 and 2 workers: checks it runs
    python bench/workers.py storage=postgres       # any overrides (e.g. a shared PostgreSQL)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

SMALL = ["+experiment=quickstart", "data.train_fraction=0.02", "data.val_fraction=0.02", "trainer.epochs=2"]


def finished_trials(work: str, name: str) -> int:
    """COMPLETE + PRUNED trials of the study in the work dir's embedded storage."""
    import optuna
    from optuna.trial import TrialState

    study = optuna.load_study(study_name=name, storage=f"sqlite:///{work}/studies.db")
    return sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    layouts = [int(n) for n in args.workers.split(",")]
    if args.quick:
        layouts, args.trials = [1, 2], 2
    print(f"study: {' '.join(SMALL + args.overrides)} study.n_trials={args.trials}; {os.cpu_count()} cores")
    base, rates = None, {}
    for n in layouts:
        work = tempfile.mkdtemp(prefix=f"fmnist-workers{n}-")
        cmd = [sys.executable, "-m", "fmnist_sweep", "workers", "-n", str(n), *SMALL, *args.overrides,
               f"study.n_trials={args.trials}", f"study.name=bench-workers-{n}-{int(time.time())}"]
        t = time.perf_counter()
        proc = subprocess.run(cmd, cwd=work, env=dict(os.environ, FMNIST_SWEEP_DIR=work),
                              capture_output=True, text=True)
        wall = time.perf_counter() - t
        if proc.returncode != 0:
            sys.exit(f"{n} workers failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        # N workers may finish up to N - 1 trials past the budget: the rate counts what finished.
        done = finished_trials(work, cmd[-1].split("=", 1)[1])
        rate = done / wall * 3600
        base, rates[n] = base or rate, rate
        print(f"{n} worker(s) x {max(1, os.cpu_count() // n)} thread(s): {wall:6.1f} s for a budget of "
              f"{args.trials} ({done} trials finished), {rate:7.0f} trials/hour, {rate / base:4.2f}x the 1-worker rate",
              flush=True)


    from fmnist_sweep.workers import default_workers

    best = max(rates, key=rates.get)
    default = default_workers(1, 0, sorted(os.sched_getaffinity(0)))
    print(f"fastest here: {best} worker(s); `fmnist-sweep workers` without -n starts {default} "
          f"(one 1-thread worker per core)" + ("" if default in rates else " (not measured in this run)"))


if __name__ == "__main__":
    main()
