"""Retrain a study's best configurations on train+val over several seeds, evaluate
each once on the test set, and register the best model in MLflow's registry."""

from __future__ import annotations

import shlex
import statistics
import tempfile
from pathlib import Path

from optuna.trial import TrialState

from . import checkpoints, record
from .config import compose
from .errors import UserError
from .served import using_tracking_uri
from .study import Study

DROP = ("seed=", "data.val_fraction=", "trainer.test=", "trainer.early_stopping_patience=")


def top_trials(study: Study, k: int) -> list:
    """The k best COMPLETE trials with distinct configurations."""
    if len(study.sweep.objectives) != 1:
        raise UserError("finalize ranks by one objective; this study has several (pick from its Pareto front "
                        "and re-run those override lines with seed=N instead)")
    maximize = study.sweep.objectives[0][1] == "maximize"
    done = [t for t in study.optuna.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if "duplicate_of" not in t.user_attrs]
    if not done:
        raise UserError(f"study '{study.name}' has no complete trial to finalize yet")
    return sorted(done, key=lambda t: t.value, reverse=maximize)[:k]


def finalize(study: Study, k: int, seeds: int, extra: list[str]) -> str:
    """Retrain the study's best ``k`` configurations over ``seeds`` on train+val, test each once, register
    the best; the report as Markdown."""
    rows = []
    for t in top_trials(study, k):
        line = [o for o in shlex.split(t.user_attrs["overrides"]) if not o.lstrip("+~").startswith(DROP)]
        line += ["data.val_fraction=0", "trainer.test=true", "trainer.early_stopping_patience=null", *extra]
        results = []
        for seed in range(seeds):
            cfg = compose(line + [f"seed={seed}"])
            cfg.trainer.progress = False
            r = record.run(cfg, line + [f"seed={seed}"], parent_run_id=study.parent_run_id, tracker=study.tracker,
                          name=f"final trial {t.number} seed {seed}",
                          tags={"fmnist.role": "final", "optuna.study": study.name,
                                "fmnist.final_of_trial": t.number}, checkpoint=cfg.study.checkpoints,
                          resume=checkpoints.final_run(study.tracker, study.name, cfg))
            if r.status != "FINISHED":
                raise UserError(f"final retraining of trial {t.number} (seed {seed}) failed: {r.message}")
            results.append(r)
            metric = "test/accuracy" if "test/accuracy" in r.metrics else "test/loss"  # classifier or autoencoder
            print(f"trial {t.number} seed {seed}: {metric} {r.metrics[metric]:.4f}", flush=True)
        values = [r.metrics[metric] for r in results]
        rows.append({"trial": t.number, "metric": metric, "values": values, "mean": statistics.mean(values),
                     "std": statistics.stdev(values) if len(values) > 1 else 0.0, "val": t.value,
                     "runs": [r.run_id for r in results], "models": [r.model_id for r in results],
                     "line": shlex.join(line)})
    higher = rows[0]["metric"] == "test/accuracy"
    best = max(rows, key=lambda r: r["mean"] if higher else -r["mean"])
    version = register(study, best)
    lines = [f"# Final models of study `{study.name}`", "",
             f"Each configuration retrained on train+val with seeds 0..{seeds - 1}, evaluated once on the test set.", "",
             f"| trial | val ({study.sweep.objectives[0][0]}) | {rows[0]['metric']} mean ± std | per seed | command |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['trial']} | {r['val']:.4f} | {r['mean']:.4f} ± {r['std']:.4f} | "
                     + ", ".join(f"{v:.4f}" for v in r["values"]) + f" | `python -m fmnist_sweep {r['line']} seed=N` |")
    uri = f"models:/{version.name}/{version.version}"
    lines += ["", f"Registered: `{uri}` (trial {best['trial']}, seed 0, run {best['runs'][0]}). Use it: "
                  f"`python -m fmnist_sweep predict {uri} IMAGES`, `mlflow.pyfunc.load_model(\"{uri}\")`, "
                  f"`mlflow models serve -m {uri} --env-manager local`."]
    text = "\n".join(lines) + "\n"
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "final.md").write_text(text)
        study.tracker.log_artifacts(study.parent_run_id, Path(tmp))
    metric = best["metric"].replace("test/", "")
    study.tracker.log(study.parent_run_id, {f"final/{metric}_mean": best["mean"], f"final/{metric}_std": best["std"]},
                      tags={"final.trial": best["trial"], "final.registered_model": f"{version.name}/{version.version}"})
    return text


def register(study: Study, best: dict):
    """The best configuration's seed-0 MLflow Model as a new version of ``fmnist-<study>``."""
    from mlflow.exceptions import MlflowException

    client, name = study.tracker.client, f"fmnist-{study.name}"
    try:
        client.create_registered_model(name, description=f"Best final model of study {study.name}")
    except MlflowException:
        pass  # it exists: add a version
    model_id = best["models"][0]
    with using_tracking_uri(study.tracker.uri):  # where the registry looks the logged model up
        return client.create_model_version(name, f"models:/{model_id}", run_id=best["runs"][0], model_id=model_id,
                                           tags={"optuna.study": study.name, "trial": str(best["trial"]),
                                                 "test_mean": f"{best['mean']:.4f}",
                                                 "test_std": f"{best['std']:.4f}"})
