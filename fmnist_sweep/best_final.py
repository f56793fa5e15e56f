"""The final models of +experiment=best: the chosen trial's configuration retrained on
train+val, one process per seed, as many at once as there are cores; and the plot of
the best validation accuracy against wall time."""

from __future__ import annotations

import json
import multiprocessing
import os
import shlex
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from optuna.trial import TrialState

from . import forks
from .best_plan import waves
from .errors import stop_signal
from .finalize import DROP


def final_line(trial, epochs: int) -> list[str]:
    """The trial's override line for a final model: all 60k images, tested once, ``epochs`` long."""
    line = [o for o in shlex.split(trial.user_attrs["overrides"])
            if not o.lstrip("+~").startswith((*DROP, "data.train_fraction=", "trainer.epochs=", "trainer.threads="))]
    return line + ["data.val_fraction=0", "data.train_fraction=1.0", "trainer.test=true",
                   "trainer.early_stopping_patience=null", f"trainer.epochs={epochs}"]


def _final_seed(job: dict) -> dict:
    """One final run, in a process of its own pinned to its cores (a pool worker forked by forks.context())."""
    os.sched_setaffinity(0, job["cores"])
    os.environ["FMNIST_DEADLINE"] = f"{job['deadline']:.0f}"
    from . import checkpoints, record
    from .config import compose
    from .errors import stop_on_signals
    from .tracking import Tracker

    stop_on_signals()
    line = job["line"] + [f"seed={job['seed']}", f"trainer.threads={len(job['cores'])}"]
    cfg = compose(line)
    cfg.trainer.progress = False
    tracker = Tracker(cfg.tracking.uri, job["study"], cfg.tracking.artifact_root)
    t0 = time.perf_counter()
    r = record.run(cfg, line, parent_run_id=job["parent"], tracker=tracker, name=f"final seed {job['seed']}",
                  tags={"fmnist.role": "final", "optuna.study": job["study"], "fmnist.final_of_trial": job["trial"]},
                  checkpoint=cfg.study.checkpoints, resume=checkpoints.final_run(tracker, job["study"], cfg))
    return {"seed": job["seed"], "status": r.status, "run_id": r.run_id, "model_id": r.model_id,
            "test": r.metrics.get("test/accuracy") if r.status == "FINISHED" else None,
            "message": r.message, "seconds": time.perf_counter() - t0}


def run_waves(study, trial, epochs: int, plan, deadline: float) -> None:
    """The seeds not finished yet, wave after wave; each finished one is kept in the study's
    user attributes (budget.final.seed.N) at once, so a resumed command skips it."""
    attrs = study.optuna.user_attrs
    todo = [s for s in range(plan.seeds) if f"budget.final.seed.{s}" not in attrs]
    line = final_line(trial, epochs)
    for k, threads in waves(len(todo), len(plan.cores)):
        batch, todo = todo[:k], todo[k:]
        jobs = [{"seed": s, "line": line, "cores": plan.cores[i * threads:(i + 1) * threads],
                 "deadline": deadline - plan.final_tail_seconds(threads),
                 "study": study.name, "parent": study.parent_run_id, "trial": trial.number}
                for i, s in enumerate(batch)]
        print(f"final: seeds {batch} at once, {threads} thread{'s' if threads > 1 else ''} each", flush=True)
        with ProcessPoolExecutor(len(jobs), mp_context=forks.context()) as pool:
            try:
                for result in pool.map(_final_seed, jobs):
                    _record(study, result)
            except KeyboardInterrupt as e:  # Ctrl-C or a stop signal: the same to each seed's process
                for child in multiprocessing.active_children():
                    os.kill(child.pid, stop_signal(e))
                raise


def _record(study, result: dict) -> None:
    seed = result["seed"]
    if result["status"] != "FINISHED":
        print(f"final seed {seed}: {result['status']} ({result['message']}) after {result['seconds']:.0f} s",
              flush=True)
        return
    study.optuna.set_user_attr(f"budget.final.seed.{seed}", json.dumps(result))
    print(f"final seed {seed}: test accuracy {result['test']:.4f} in {result['seconds'] / 60:.1f} min", flush=True)


def plot_progress(study) -> None:
    """best_val_vs_time.png on the study's parent run (progress_png)."""
    with tempfile.TemporaryDirectory() as tmp:
        if progress_png(study, Path(tmp) / "best_val_vs_time.png"):
            study.tracker.log_artifacts(study.parent_run_id, Path(tmp))


def progress_png(study, path: Path) -> bool:
    """Accuracy against minutes since the search began: each search trial's last validation
    accuracy (COMPLETE or PRUNED), the best COMPLETE one so far until the search's end, and the
    final models' test accuracies. False when no trial has finished."""
    from .artifacts import _pyplot

    ended = [t for t in study.optuna.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
             if t.datetime_complete is not None and t.intermediate_values]
    if not ended:
        return False
    t0 = min(t.datetime_start for t in study.optuna.get_trials(deepcopy=False) if t.datetime_start)
    minutes = lambda when: (when - t0).total_seconds() / 60  # noqa: E731
    ended.sort(key=lambda t: t.datetime_complete)
    xs, ys, best = [], [], None
    for t in ended:
        if t.state == TrialState.COMPLETE:
            best = t.value if best is None else max(best, t.value)
        if best is not None:
            xs.append(minutes(t.datetime_complete))
            ys.append(best)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.scatter([minutes(t.datetime_complete) for t in ended], [t.intermediate_values[t.last_step] for t in ended],
               s=14, color="0.6", label="search trial: last validation accuracy")
    ax.step(xs, ys, where="post", color="C0", label="search: best complete trial's validation accuracy")
    runs = study.tracker.client.search_runs([study.tracker.experiment_id], "tags.`fmnist.role` = 'final'")
    finals = [(r.info.end_time / 1000 - t0.timestamp()) / 60 for r in runs if "test/accuracy" in r.data.metrics]
    if finals:
        ax.scatter(finals, [r.data.metrics["test/accuracy"] for r in runs if "test/accuracy" in r.data.metrics],
                   color="C1", marker="D", label="final model: test accuracy")
    ax.set(xlabel="minutes since the search began", ylabel="accuracy", title=f"study {study.name}")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
