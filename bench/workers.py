"""Trials per hour of one fixed small study with 1, 2 and 4 local CPU workers, and with
workers started by hand (the same command N times at once, sharing the cores: cores.py).

Each layout runs the same study from scratch (fresh stores) through
`python -m fmnist_sweep workers -n N` (or N plain commands), so start-up, storage and MLflow
costs are in.

    python bench/workers.py                        # 1, 2, 4 workers, SQLite + local MLflow
    python bench/workers.py --workers 2 --by-hand 3   # workers -n 2 beside 3 hand-started ones
    python bench/workers.py --quick                # 2 trials, `workers -n 1` and 1 by hand: checks it runs
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


def run_layout(n: int, args) -> tuple[float, int]:
    """The study from scratch with ``workers -n N`` (or -N plain commands at once): (wall s, trials finished)."""
    work = tempfile.mkdtemp(prefix=f"fmnist-workers{n}-")
    name = f"bench-workers-{n}-{int(time.time())}"
    line = [*SMALL, *args.overrides, f"study.n_trials={args.trials}", f"study.name={name}"]
    env = dict(os.environ, FMNIST_SWEEP_DIR=work, FMNIST_CORES_DIR=os.path.join(work, "cores"))
    cmds = ([[sys.executable, "-m", "fmnist_sweep", "workers", "-n", str(n), *line]] if n > 0 else
            [[sys.executable, "-m", "fmnist_sweep", *line]] * -n)
    t = time.perf_counter()
    procs = [subprocess.Popen(c, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for c in cmds]
    outs = [p.communicate()[0] for p in procs]
    wall = time.perf_counter() - t
    if any(p.returncode for p in procs):
        sys.exit(f"layout {n} failed:\n" + "\n".join(o[-2000:] for o in outs))
    # N workers may finish up to N - 1 trials past the budget: the rate counts what finished.
    return wall, finished_trials(work, name)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--by-hand", type=int, default=0, help="also N workers started by hand at once")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    layouts = [int(n) for n in args.workers.split(",")] + ([-args.by_hand] if args.by_hand else [])
    if args.quick:
        layouts, args.trials = [1, -1], 2
    print(f"study: {' '.join(SMALL + args.overrides)} study.n_trials={args.trials}; {os.cpu_count()} cores")
    base, rates = None, {}
    for n in layouts:  # n < 0: -n workers started by hand
        wall, done = run_layout(n, args)
        rate = done / wall * 3600
        base, rates[n] = base or rate, rate
        what = f"{-n} worker(s) by hand, sharing the cores" if n < 0 else \
            f"{n} worker(s) x {max(1, os.cpu_count() // n)} thread(s)"
        print(f"{what}: {wall:6.1f} s for a budget of {args.trials} ({done} trials finished), {rate:7.0f} trials/hour, "
              f"{rate / base:4.2f}x the first line's rate", flush=True)


    from fmnist_sweep.workers import default_workers

    best = max((n for n in rates if n > 0), key=rates.get)
    default = default_workers(1, 0, sorted(os.sched_getaffinity(0)))
    print(f"fastest here: {best} worker(s); `fmnist-sweep workers` without -n starts {default} "
          f"(one 1-thread worker per core)" + ("" if default in rates else " (not measured in this run)"))


if __name__ == "__main__":
    main()
