"""Where a study trial's wall time goes: training, evaluation, Optuna storage, MLflow
logging, artifact rendering, and the rest (Hydra composition, data, start-up).

    python bench/trial_breakdown.py                      # quickstart experiment, 3 trials
    python bench/trial_breakdown.py --quick              # tiny slice, 2 trials: checks it runs
    python bench/trial_breakdown.py storage=journal      # any overrides
"""

from __future__ import annotations

import argparse
import functools
import os
import tempfile
import time
from collections import defaultdict

SPENT: dict[str, float] = defaultdict(float)


def timed(owner, name, bucket):
    fn = getattr(owner, name)

    @functools.wraps(fn)
    def wrapper(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            SPENT[bucket] += time.perf_counter() - t

    setattr(owner, name, wrapper)


def instrument(artifacts="artifact rendering (plots, tables, weights)", mlflow="mlflow logging",
               storage="optuna storage", models="mlflow model (export, save, upload)") -> None:
    """Count the time spent in artifact rendering, MLflow calls, logging MLflow Models and
    Optuna storage calls."""
    import optuna

    from fmnist_sweep import record, served
    from fmnist_sweep.tracking import Tracker

    timed(record, "_write_artifacts", artifacts)
    timed(served, "log", models)
    for name in ("start", "log", "log_datasets", "log_artifacts", "end"):
        timed(Tracker, name, mlflow)
    for cls in (optuna.storages.RDBStorage, optuna.storages.JournalStorage):
        for name in [n for n in vars(cls) if not n.startswith("_") and callable(getattr(cls, n))]:
            timed(cls, name, storage)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    os.chdir(tempfile.mkdtemp(prefix="fmnist-bench-"))  # fresh stores, as a first study has

    from fmnist_sweep import train
    from fmnist_sweep.config import compose
    from fmnist_sweep.study import Study

    timed(train, "train_epoch", "train")
    timed(train, "evaluate", "evaluate")
    instrument()

    quick = ["data.train_fraction=0.01", "trainer.epochs=1", "study.n_trials=2"] if args.quick else []
    overrides = ["+experiment=quickstart", f"study.n_trials={args.trials}", *quick, *args.overrides]
    study = Study(compose(overrides), overrides)
    SPENT.clear()  # count the trials only, not opening the study
    t0 = time.perf_counter()
    study.optimize()
    wall = time.perf_counter() - t0
    n = len(study.optuna.trials)
    SPENT["other (compose, data, start-up, progress)"] = wall - sum(SPENT.values())
    print(f"{n} trials, {wall:.1f} s wall, {wall / n:.2f} s per trial ({' '.join(overrides)})")
    for bucket, seconds in sorted(SPENT.items(), key=lambda kv: -kv[1]):
        print(f"  {bucket:<44}{seconds / n:8.3f} s/trial {100 * seconds / wall:6.1f} %")


if __name__ == "__main__":
    main()
