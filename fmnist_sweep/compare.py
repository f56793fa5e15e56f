"""Compare studies and runs: which model family and configuration, and how sure we are.

``python -m fmnist_sweep compare NAME [NAME ...]`` where each NAME is a study or
an MLflow run id. Everything is read from the record (Optuna storage, MLflow runs
and their artifacts) and written as Markdown (printed, and with its plots and
tables in ``--out DIR`` and in a run of the MLflow experiment ``compare``):

- one row per model family: its best configuration, validation and test accuracy
  as mean ± std over seeds (a study's finalised runs when it has them), parameter
  count, training time, images/s; then each family's per-class precision / recall /
  F1 table and confusion matrix;
- for a study whose sweep replicates seeds (``seed: choice(...)``): one row per level
  of the other parameters with its mean ± std, and Welch's t-test of each level
  against the best one, with a plot of the objective vs the level (error bars);
- for autoencoder studies: the best model's latent space projected to 2-D (PCA),
  coloured by class."""

from __future__ import annotations

import math
import re
import shlex
import shutil
import statistics
import tempfile
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from . import tracking  # noqa: F401  (MLflow's environment defaults, before mlflow is imported)
from .artifacts import factor_plot, latent_plot
from .errors import UserError

RUN_ID = re.compile(r"[0-9a-f]{32}")


@dataclass
class Entry:
    """One finished MLflow run taking part in the comparison."""

    run: object              # mlflow.entities.Run
    source: str              # the study's name, or "run"
    role: str                # trial, final or single
    family: str
    task: str
    config: str              # the run's overrides without seed=
    seed: int
    params: dict = field(default_factory=dict)   # the Optuna trial's params (studies)
    final_of: int | None = None

    @property
    def metrics(self) -> dict:
        return self.run.data.metrics

    @property
    def run_id(self) -> str:
        return self.run.info.run_id


@dataclass
class Group:
    """Runs of one configuration over seeds."""

    entries: list

    def values(self, metric):
        return [e.metrics[metric] for e in self.entries if metric in e.metrics]

    def stat(self, metric):
        v = self.values(metric)
        if not v:
            return None
        return statistics.mean(v), (statistics.stdev(v) if len(v) > 1 else 0.0), len(v)


@dataclass
class StudyRecord:
    """What the comparison reads of one study: its objective, its complete trials' runs,
    the parameters of its failed trials, and the MLflow client of its store."""

    name: str
    objective: tuple[str, str]  # (metric, "maximize" | "minimize")
    trials: list[Entry]
    failed: list[dict] = field(default_factory=list)
    client: object = None       # mlflow.MlflowClient


def _without_seed(overrides: str) -> str:
    return shlex.join(o for o in shlex.split(overrides) if not o.startswith(("seed=", "sweep=")))


def _entry(run, source, role, params=None) -> Entry:
    """One compared run: its family, scores and timings as the report's row needs them."""
    tags = run.data.tags
    seed = int(float(run.data.params.get("seed", 0)))
    final_of = tags.get("fmnist.final_of_trial")
    return Entry(run, source, role, tags.get("fmnist.model", "?"), tags.get("fmnist.task", "classify"),
                 _without_seed(tags.get("fmnist.overrides", "")), seed, dict(params or {}),
                 int(final_of) if final_of is not None else None)


def _all_runs(client, experiment_id) -> list:
    """Every run of an MLflow experiment, page by page."""
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], max_results=1000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


def gather(names: list[str], where: list[str]) -> tuple[list[Entry], list[StudyRecord], object]:
    """Entries of the named studies / runs, the studies' own facts, and the MLflow client of their store."""
    from optuna.trial import TrialState

    from .config import compose
    from .study import interrupted, open_study
    from .tracking import Tracker

    entries, studies = [], []
    cfg = compose(where)
    tracker = client = None
    for name in names:
        if RUN_ID.fullmatch(name):
            tracker = tracker or Tracker(cfg.tracking.uri, cfg.tracking.experiment, cfg.tracking.artifact_root)
            from mlflow.exceptions import MlflowException

            try:
                run = tracker.client.get_run(name)
            except MlflowException:
                raise UserError(f"no MLflow run {name} in {tracker.uri}") from None
            if run.info.status != "FINISHED":
                raise UserError(f"run {name} is {run.info.status}: compare takes finished runs")
            entries.append(_entry(run, "run", "single"))
            client = tracker.client
            continue
        study = open_study(where, name)
        client = study.tracker.client
        runs = {r.info.run_id: r for r in _all_runs(study.tracker.client, study.tracker.experiment_id)}
        trials = [t for t in study.optuna.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                  if "duplicate_of" not in t.user_attrs and t.user_attrs.get("mlflow_run_id") in runs]
        study_entries = [_entry(runs[t.user_attrs["mlflow_run_id"]], name, "trial", t.params) for t in trials]
        finals = [_entry(r, name, "final") for r in runs.values()
                  if r.data.tags.get("fmnist.role") == "final" and r.info.status == "FINISHED"]
        entries += study_entries + finals
        failed = [t.params for t in study.optuna.get_trials(deepcopy=False, states=(TrialState.FAIL,))
                  if not interrupted(t)]
        studies.append(StudyRecord(name, tuple(study.sweep.objectives[0]), study_entries, failed,
                                   study.tracker.client))
    if not entries:
        raise UserError("nothing to compare: the named studies have no complete trial yet")
    return entries, studies, client


def _fmt_stat(s, digits=4) -> str:
    if s is None:
        return "—"
    mean, std, n = s
    return f"{mean:.{digits}f} ± {std:.{digits}f} (n={n})" if n > 1 else f"{mean:.{digits}f} (n=1)"


def family_rows(entries: list[Entry]) -> list[dict]:
    """Per classifier family: its best configuration and how it does."""
    rows = []
    by_family = defaultdict(list)
    for e in entries:
        if e.task == "classify":
            by_family[e.family].append(e)
    for family, es in sorted(by_family.items()):
        finals, selection = defaultdict(list), defaultdict(list)
        for e in es:
            if e.role == "final":
                finals[(e.source, e.final_of)].append(e)
            else:
                selection[(e.source, e.config)].append(e)
        if finals:  # the finalised configuration with the best mean test accuracy
            key, best = max(finals.items(), key=lambda kv: Group(kv[1]).stat("test/accuracy")[0])
            source, trial = key
            picked = [e for e in es if e.role == "trial" and e.source == source
                      and e.run.data.tags.get("optuna.trial_number") == str(trial)]
            val_group = Group(picked)
            origin = f"{source} trial {trial}, finalised"
        else:
            key, best = max(selection.items(), key=lambda kv: Group(kv[1]).stat("val/accuracy")[0]
                            if Group(kv[1]).stat("val/accuracy") else -1)
            val_group = Group(best)
            origin = key[0]
        group = Group(best)
        first = min(best, key=lambda e: e.seed)
        rows.append({"family": family, "origin": origin, "config": first.config or "(defaults)",
                     "val": val_group.stat("val/accuracy"), "test": group.stat("test/accuracy"),
                     "params": first.metrics.get("model/n_params"),
                     "seconds": group.stat("perf/train_seconds"), "images_per_s": group.stat("perf/images_per_s"),
                     "run": first, "runs": len(es)})
    return rows


def factor_rows(study: StudyRecord) -> list[dict] | None:
    """Levels of a seed-replicated study: the objective's mean ± std per level and Welch's
    t-test of each level against the best. None when the study does not replicate seeds."""
    from scipy import stats

    trials = study.trials
    if not trials or not any("seed" in e.params for e in trials):
        return None
    metric, direction = study.objective
    levels, failures = defaultdict(list), defaultdict(int)

    def level(params):
        return tuple(sorted((k, v) for k, v in params.items() if k != "seed"))

    for e in trials:
        if metric in e.metrics:
            levels[level(e.params)].append(e.metrics[metric])
    for params in study.failed:  # e.g. diverged: a finding too
        failures[level(params)] += 1
    sign = 1 if direction == "maximize" else -1
    best_key = max(levels, key=lambda k: sign * statistics.mean(levels[k])) if levels else None
    rows = []
    for key, values in levels.items():
        p = None
        # Welch's test needs spread: where neither level varies over its seeds (tiny or
        # fully deterministic runs) it is undefined, and scipy returned p = 0 or 1 from
        # rounding noise; such rows show no p-value. Where one level alone is constant the
        # test is sound, and scipy's warning about that level's zero variance is noise.
        if (key != best_key and len(values) > 1 and len(levels[best_key]) > 1
                and (len(set(values)) > 1 or len(set(levels[best_key])) > 1)):
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", "Precision loss occurred", RuntimeWarning)
                p = float(stats.ttest_ind(levels[best_key], values, equal_var=False).pvalue)
        rows.append({"level": ", ".join(f"{k}={v}" for k, v in key) or "(defaults)", "key": key,
                     "mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                     "n": len(values), "p": p, "best": key == best_key, "failed": failures.pop(key, 0)})
    for key, n in failures.items():  # levels where no seed finished
        rows.append({"level": ", ".join(f"{k}={v}" for k, v in key), "key": key, "mean": None, "std": None,
                     "n": 0, "p": None, "best": False, "failed": n})
    return sorted(rows, key=_level_order)


def _level_order(row):
    key = row["key"]
    if len(key) == 1 and isinstance(key[0][1], (int, float)):
        return (0, key[0][1], "")
    return (1, 0, row["level"])


def _per_class(entry: Entry, client, out: Path) -> list[str]:
    """The family's best run's per-class table (Markdown lines) and its confusion matrix copied to out."""
    import csv

    tmp = Path(tempfile.mkdtemp())
    lines = []
    for split in ("test", "val"):
        try:
            table = client.download_artifacts(entry.run_id, f"classification_report_{split}.csv", str(tmp))
        except Exception:  # noqa: BLE001 — this split was not evaluated by that run
            continue
        try:
            png = client.download_artifacts(entry.run_id, f"confusion_matrix_{split}.png", str(tmp))
            shutil.copy(png, out / f"confusion_{entry.family}.png")
        except Exception:  # noqa: BLE001
            pass
        with open(table) as f:
            rows = list(csv.DictReader(f))
        lines += [f"Per class, {split} set (run `{entry.run_id}`, seed {entry.seed}):", "",
                  "| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
        lines += [f"| {r['class']} | {r['precision']} | {r['recall']} | {r['f1-score']} | {r['support']} |"
                  for r in rows]
        worst = min((r for r in rows if "avg" not in r["class"]), key=lambda r: float(r["f1-score"]))
        lines += ["", f"Weakest class: **{worst['class']}** (F1 {worst['f1-score']}).", ""]
        if (out / f"confusion_{entry.family}.png").exists():
            lines += [f"![confusion matrix {entry.family}](confusion_{entry.family}.png)", ""]
        break
    return lines


def report(names: list[str], where: list[str], out: Path) -> str:
    """The comparison as Markdown, with its plots and tables written into ``out``."""
    entries, studies, client = gather(names, where)
    lines = [f"# Comparison: {', '.join(names)}", ""]
    fam = family_rows(entries)
    if fam:
        lines += ["## Model families", "",
                  "Accuracy as mean ± std over seeds (n runs). Test figures come from runs that evaluated the "
                  "test set once at their end (finalised runs of a study, or single runs).", "",
                  "| family | best configuration | from | val accuracy | test accuracy | params | train s | images/s |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in fam:
            params = f"{int(r['params']):,}" if r["params"] is not None else "—"
            secs = f"{r['seconds'][0]:.0f}" if r["seconds"] else "—"
            ips = f"{r['images_per_s'][0]:,.0f}" if r["images_per_s"] else "—"
            lines.append(f"| {r['family']} | `{r['config']}` | {r['origin']} | {_fmt_stat(r['val'])} | "
                         f"{_fmt_stat(r['test'])} | {params} | {secs} | {ips} |")
        lines.append("")
        for r in fam:
            lines += [f"### {r['family']}", ""] + _per_class(r["run"], client, out)
    for study in studies:
        rows = factor_rows(study)
        if rows:
            metric, direction = study.objective
            lines += [f"## Study `{study.name}`: {metric} per level ({direction}), over seeds", "",
                      f"| level | {metric} mean | std | seeds | Welch's t-test p vs best |", "|---|---|---|---|---|"]
            for r in rows:
                failed = f" ({r['failed']} failed: diverged or crashed)" if r["failed"] else ""
                if r["mean"] is None:
                    lines.append(f"| {r['level']} | — | — | 0{failed} | — |")
                    continue
                p = "best" if r["best"] else (f"{r['p']:.3g}" if r["p"] is not None and math.isfinite(r["p"]) else "—")
                lines.append(f"| {r['level']} | {r['mean']:.5f} | {r['std']:.5f} | {r['n']}{failed} | {p} |")
            png = f"factor_{study.name}.png"
            factor_plot(study.name, metric, rows, out / png)
            lines += ["", f"![{metric} per level]({png})", ""]
        recon = [e for e in study.trials if e.task == "reconstruct" and "val/loss" in e.metrics]
        if recon:
            best = min(recon, key=lambda e: e.metrics["val/loss"])
            png = f"latent_{study.name}.png"
            split = latent_plot(best.run_id, study.client, out / png)
            lines += [f"Latent space of the best autoencoder of `{study.name}` (val/loss "
                      f"{best.metrics['val/loss']:.5f}, `{best.config}` seed {best.seed}), {split} images, "
                      "PCA to 2-D:", "", f"![latent space]({png})", ""]
    text = "\n".join(lines) + "\n"
    (out / "compare.md").write_text(text)
    return text


def compare(names: list[str], where: list[str], out_dir: str | None) -> tuple[str, str]:
    """Write the comparison (to out_dir if given) and log it to MLflow experiment ``compare``.
    Returns (markdown, MLflow run id)."""
    from .config import compose
    from .tracking import Tracker

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(out_dir) if out_dir else Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        text = report(names, where, out)
        cfg = compose(where)
        tracker = Tracker(cfg.tracking.uri, "compare", cfg.tracking.artifact_root)
        run_id = tracker.start("compare " + " ".join(names), {"inputs": " ".join(names)},
                               {"fmnist.role": "compare"})
        tracker.log_artifacts(run_id, out)
        tracker.end(run_id, "FINISHED")
    return text, run_id
