"""A run's last finished epoch, saved where every worker can read it: an MLflow artifact of
its run (``checkpoint/last.pt``, replaced each epoch), through whatever tracking store the
study uses. A retried trial (a worker stopped by SIGTERM, killed, or cut from the storage)
resumes from its predecessor's checkpoint at the next epoch, in a new run linked to the old
one, and trains as the uninterrupted run would have: the model, optimizer, scheduler and
moving average, the global and data-order random states, and the epochs' metrics are all in
it. ``study.checkpoints``: delete (a finished run's checkpoint is removed), keep, off."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from .errors import stops_deferred

FOLDER, FILE = "checkpoint", "last.pt"


def state(b, epoch: int, generator, scheduler, result, stale: int, best_state) -> dict:
    """Everything the epochs after ``epoch`` depend on (train.fit's loop state); the run adds its
    configuration's fingerprint once (record.run), not in each epoch's stop-interruptible code."""
    return {"epoch": epoch, "model": b.model.state_dict(),
            "optimizer": b.optimizer.state_dict(), "scheduler": scheduler.state_dict() if scheduler else None,
            "ema": b.ema.state_dict() if b.ema is not None else None, "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if b.device.type == "cuda" else None,
            "generator": generator.get_state(), "history": result.history, "best": result.best, "stale": stale,
            "best_state": best_state}


def restore(b, saved: dict, generator, scheduler, result) -> tuple[int, int, dict | None]:
    """Put ``saved`` back into the built run and fit's loop; (the next epoch, stale epochs,
    the early-stopping best weights)."""
    b.model.load_state_dict(saved["model"])
    b.optimizer.load_state_dict(saved["optimizer"])
    if scheduler is not None and saved["scheduler"] is not None:
        scheduler.load_state_dict(saved["scheduler"])
    if b.ema is not None and saved["ema"] is not None:
        b.ema.load_state_dict(saved["ema"])
    torch.set_rng_state(saved["rng"])
    if saved["cuda_rng"] is not None and b.device.type == "cuda":
        torch.cuda.set_rng_state_all(saved["cuda_rng"])
    generator.set_state(saved["generator"])
    result.history = list(saved["history"])
    result.metrics = {k: v for k, v in result.history[-1].items() if k != "epoch"}
    result.best = saved["best"]
    return saved["epoch"] + 1, saved["stale"], saved["best_state"]


def save(tracker, run_id: str, saved: dict) -> None:
    """The run's checkpoint, replaced whole: a stop signal arriving meanwhile waits until it is written."""
    with stops_deferred(), tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / FILE
        torch.save(saved, path)
        tracker.client.log_artifact(run_id, str(path), FOLDER)


def load(tracker, run_id: str) -> dict | None:
    """The run's checkpoint, or None where it left none (or it cannot be read)."""
    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory() as folder:
        try:
            path = tracker.client.download_artifacts(run_id, f"{FOLDER}/{FILE}", folder)
            return torch.load(path, map_location="cpu", weights_only=True)
        except (MlflowException, OSError, RuntimeError):
            return None


def delete(tracker, run_id: str) -> None:
    """Remove the run's checkpoint (its other artifacts stay)."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    try:
        get_artifact_repository(tracker.client.get_run(run_id).info.artifact_uri).delete_artifacts(FOLDER)
    except Exception:  # nothing to delete, or a store that cannot: the checkpoint stays, nothing breaks
        pass


def latest(tracker, queries: list[str], fingerprint: str) -> tuple[str, dict] | None:
    """The newest checkpoint of the same configuration left by a run that ``queries`` (MLflow
    filters, the first tried first) find: (its run id, its state)."""
    for query in queries:
        for run in tracker.client.search_runs([tracker.experiment_id], query,
                                              order_by=["attributes.start_time DESC"]):
            saved = load(tracker, run.info.run_id)
            if saved is not None and saved.get("fingerprint") == fingerprint:
                return run.info.run_id, saved
    return None


def of_trials(study: str, numbers: list[int]) -> list[str]:
    """Queries for the runs of trials ``numbers`` (a retry's predecessors, oldest first), newest first."""
    return [f"tags.`optuna.study` = '{study}' and tags.`optuna.trial_number` = '{n}'" for n in reversed(numbers)]


def final_run(tracker, study: str, cfg) -> tuple[str, dict] | None:
    """A stopped final model's checkpoint (finalize, or best's final phase) of the same
    configuration and seed: its retraining goes on from there."""
    from .config import config_fingerprint

    query = f"tags.`optuna.study` = '{study}' and tags.`fmnist.role` = 'final' and attributes.status != 'FINISHED'"
    return latest(tracker, [query], config_fingerprint(cfg))
