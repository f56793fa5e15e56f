"""A study's own record: the trials table, the best trial, and Optuna's plots
(PNG for a glance, one interactive HTML page), logged to the study's parent run."""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import optuna
from optuna.trial import TrialState

from .errors import UserError
from .study import Study, states


def trial_rows(study: Study) -> list[dict]:
    """One dict per trial: number, state, values, params, time, host and MLflow run."""
    rows = []
    for t in study.optuna.get_trials(deepcopy=False):
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start else None
        rows.append({"number": t.number, "state": t.state.name,
                     "values": t.values, "last_step": t.last_step,
                     "params": t.params, "seconds": seconds,
                     "overrides": t.user_attrs.get("overrides", ""),
                     "host": t.user_attrs.get("host", ""), "device": t.user_attrs.get("device", ""),
                     "duplicate_of": t.user_attrs.get("duplicate_of"),
                     "mlflow_run_id": t.user_attrs.get("mlflow_run_id", "")})
    return rows


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def markdown(study: Study) -> str:
    """The study's summary: counts, best trials with their re-run commands, the trials table."""
    objectives = study.sweep.objectives
    c = study.counts()
    lines = [f"# Study `{study.name}`", "",
             f"Sweep `sweeps/{study.sweep.name}.yaml`; objective: "
             + ", ".join(f"{d} {m}" for m, d in objectives) + f"; budget {study.n_trials} trials.", "",
             f"Trials: {states(c)}, {c['RUNNING']} running, {c['WAITING']} waiting.", ""]
    best = study.best_trials()
    if best:
        lines += ["## Best", ""]
        for t in best:
            vals = ", ".join(f"{m} {v:.4f}" for (m, _), v in zip(objectives, t.values))
            lines += [f"- trial {t.number}: {vals}", f"  `python -m fmnist_sweep {t.user_attrs.get('overrides', '')}`"]
        lines.append("")
    rows = trial_rows(study)
    keys = sorted({k for r in rows for k in r["params"]})
    header = ["trial", "state", *(m for m, _ in objectives), *keys, "seconds", "host"]
    lines += ["## Trials", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        values = r["values"] or [None] * len(objectives)
        cells = [str(r["number"]), r["state"] + (f" (= {r['duplicate_of']})" if r["duplicate_of"] is not None else ""),
                 *(_fmt(v) if v is not None else "" for v in values),
                 *(_fmt(r["params"].get(k, "")) for k in keys),
                 f"{r['seconds']:.0f}" if r["seconds"] is not None else "", r["host"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _most_important(study: Study, params: list[str], target, n: int = 2) -> list[str]:
    """The ``n`` of ``params`` that fANOVA ranks first (the importance plot's own ranking);
    the first ``n`` as given where it cannot rank them."""
    try:
        ranked = optuna.importance.get_param_importances(
            study.optuna, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0), params=params,
            target=target)
        return sorted(list(ranked)[:n])
    except (ValueError, RuntimeError):
        return params[:n]


def _plots(study: Study):
    """(name, plotly figure function, matplotlib function, kwargs, PNG-only kwargs) for what
    the study supports."""
    vis, mvis = optuna.visualization, optuna.visualization.matplotlib
    objectives = study.sweep.objectives
    complete = [t for t in study.optuna.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    if not complete:  # nothing to draw yet
        return []
    params = {k for t in complete for k in t.params}
    n_params = len(params)
    # A contour over a parameter that never changed is an empty panel (and an Optuna warning).
    varying = sorted(k for k in params if len({repr(t.params.get(k)) for t in complete}) > 1)
    kw = {}
    if len(objectives) > 1:
        kw = {"target": lambda t: t.values[0], "target_name": objectives[0][0]}
    plots = [("optimization_history", vis.plot_optimization_history, mvis.plot_optimization_history, kw, {})]
    if len(objectives) == 1:
        plots.append(("intermediate_values", vis.plot_intermediate_values, mvis.plot_intermediate_values, {}, {}))
    if len(objectives) > 1:
        names = [m for m, _ in objectives]
        plots.append(("pareto_front", vis.plot_pareto_front, mvis.plot_pareto_front, {"target_names": names}, {}))
    if n_params >= 1 and len(complete) >= 2:
        imp = {"evaluator": optuna.importance.FanovaImportanceEvaluator(seed=0), **kw}
        plots += [("param_importances", vis.plot_param_importances, mvis.plot_param_importances, imp, {}),
                  ("parallel_coordinate", vis.plot_parallel_coordinate, mvis.plot_parallel_coordinate, kw, {}),
                  ("slice", vis.plot_slice, mvis.plot_slice, kw, {})]
    if len(varying) >= 2:
        # Every pair in the interactive page; in the PNG one readable panel, the two parameters
        # that matter most (matplotlib interpolates each panel: a grid of them is slow).
        png = {} if len(varying) == 2 else {"params": _most_important(study, varying, kw.get("target"))}
        plots.append(("contour", vis.plot_contour, mvis.plot_contour, {"params": varying, **kw}, png))
    return plots


def write(study: Study, out: Path) -> list[str]:
    """Write the study's artifacts into ``out``; returns notes on plots that could not be made."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    notes = []
    (out / "summary.md").write_text(markdown(study))
    df = study.optuna.trials_dataframe()
    df.to_csv(out / "trials.csv", index=False)
    figures = []
    plots = _plots(study) if study.cfg.tracking.get("plots", True) else []  # (tracking.plots=false: tables only)
    for name, plotly_fn, mpl_fn, kw, png_kw in plots:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                figures.append((name, plotly_fn(study.optuna, **kw)))
                ax = mpl_fn(study.optuna, **{**kw, **png_kw})
            fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
            fig.set_size_inches(max(fig.get_size_inches()[0], 8), max(fig.get_size_inches()[1], 5))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fig.tight_layout()
            fig.savefig(out / f"{name}.png", dpi=100)
            plt.close(fig)
        except Exception as e:  # a plot Optuna cannot draw for this study (e.g. too few trials)
            notes.append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            plt.close("all")
    if figures:
        parts = [f"<h2>{name.replace('_', ' ')}</h2>" + fig.to_html(full_html=False,
                                                                  include_plotlyjs="inline" if i == 0 else False)
                 for i, (name, fig) in enumerate(figures)]
        (out / "study_plots.html").write_text(
            f"<html><head><meta charset='utf-8'><title>{study.name}</title></head><body>"
            f"<h1>Study {study.name}</h1>{''.join(parts)}</body></html>")
    if notes:
        (out / "plot_notes.txt").write_text("\n".join(notes) + "\n")
    return notes


def publish(study: Study) -> None:
    """Refresh the parent run: artifacts, and the best trial's params (tags) and values (metrics)."""
    if study.parent_run_id is None:
        raise UserError(f"study '{study.name}' has no MLflow parent run in {study.tracker.uri}: "
                        "check tracking.uri (the store its workers used)")
    with tempfile.TemporaryDirectory() as tmp:
        write(study, Path(tmp))
        study.tracker.log_artifacts(study.parent_run_id, Path(tmp))
    best = study.best_trials()
    c = study.counts()
    metrics = {"study/complete": c["COMPLETE"], "study/pruned": c["PRUNED"], "study/failed": c["FAIL"]}
    tags = {}
    if len(study.sweep.objectives) == 1 and best:
        b = best[0]
        metrics[f"best/{study.sweep.objectives[0][0]}"] = b.value
        tags = {"best.trial": b.number, "best.overrides": b.user_attrs.get("overrides", ""),
                "best.mlflow_run_id": b.user_attrs.get("mlflow_run_id", ""),
                **{f"best.{k}": v for k, v in b.params.items()}}
    study.tracker.log(study.parent_run_id, metrics, step=c["COMPLETE"] + c["PRUNED"], tags=tags)
