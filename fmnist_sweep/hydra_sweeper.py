"""A sweep file in hydra-optuna-sweeper's shape — the plugin's own example, or
lightning-hydra-template's ``configs/hparams_search/*.yaml`` — read as one of ours
(sweeps/NAME.yaml). What maps is translated; what cannot be honoured is named, one line
each, with what to use instead (docs/GUIDE.md has the table)."""

from __future__ import annotations

import difflib
import sys

from .errors import UserError

# The plugin's sampler config group (`override hydra/sweeper/sampler: NAME`) -> our sampler spec.
SAMPLERS = {"tpe": {"name": "tpe"}, "random": {"name": "random"}, "cmaes": {"name": "cmaes"},
            "nsgaii": {"name": "nsga2"}, "grid": {"name": "grid"}, "motpe": {"name": "tpe"},
            "qmc": {"_target_": "optuna.samplers.QMCSampler"}}
# lightning-hydra-template's metric and key names -> ours.
METRICS = {"val/acc": "val/accuracy", "val/acc_best": "val/accuracy", "val/loss_best": "val/loss",
           "train/acc": "val/accuracy"}
KEYS = {"model.optimizer.lr": "optimizer.lr", "model.optimizer.weight_decay": "optimizer.weight_decay",
        "data.batch_size": "trainer.batch_size", "trainer.max_epochs": "trainer.epochs"}


def is_plugin_file(spec: dict) -> bool:
    """A file in the plugin's shape: it configures ``hydra.sweeper`` or overrides Hydra's sweeper."""
    return "hydra" in spec or any("hydra/sweeper" in str(d) for d in spec.get("defaults") or [])


def translate(spec: dict, path, metrics: tuple[str, ...], config_keys) -> dict:
    """The file's sweep in our keys; a note on stderr for each setting taken another way.
    ``config_keys()`` gives the keys a trial's config can have, to name params we have not."""
    sweeper = ((spec.get("hydra") or {}).get("sweeper")) or {}
    notes, out = [], {"n_trials": sweeper.get("n_trials", 20)}
    extra = sorted(set(spec) - {"defaults", "hydra", "optimized_metric", "task_name"})
    if extra:
        raise UserError(f"{path}: {extra[0]}: a sweep file sets no config; put it on the command line "
                        f"({extra[0]}=...)")
    _objective(spec, sweeper, path, metrics, notes, out)
    out["sampler"] = _sampler(spec, sweeper, path)
    if (sweeper.get("n_jobs") or 1) > 1:
        notes.append(f"n_jobs: {sweeper['n_jobs']} -> run `workers -n {sweeper['n_jobs']}` (processes, one per core)")
    if sweeper.get("storage"):
        notes.append("storage: taken from storage=... (e.g. storage=postgres with $FMNIST_STORAGE_URL), not the file")
    if sweeper.get("study_name"):
        notes.append(f"study_name: use study.name={sweeper['study_name']}")
    out["params"] = _params(sweeper.get("params") or {}, path, notes, config_keys)
    for note in notes:
        print(f"{path}: {note}", file=sys.stderr)
    return out


def _objective(spec, sweeper, path, metrics, notes, out) -> None:
    direction = sweeper.get("direction", "minimize")  # the plugin's default
    if isinstance(direction, list):
        raise UserError(f"{path}: direction is a list: name each objective's metric with objectives: "
                        f"[{{metric: val/accuracy, direction: maximize}}, ...]")
    metric = spec.get("optimized_metric")
    if metric is None:
        metric = "val/accuracy" if direction == "maximize" else "val/loss"
        notes.append(f"no optimized_metric: the objective is {metric} ({direction})")
    elif metric in METRICS:
        notes.append(f"optimized_metric {metric} -> {METRICS[metric]}")
        metric = METRICS[metric]
    elif metric not in metrics:
        close = difflib.get_close_matches(metric, metrics, n=2, cutoff=0.3)
        raise UserError(f"{path}: optimized_metric {metric!r} is not recorded here; "
                        f"the closest: {', '.join(close or metrics)}")
    out["objective"], out["direction"] = metric, direction


def _sampler(spec, sweeper, path) -> dict:
    chosen = [str(d).split(":", 1)[1].strip(" }'") for d in spec.get("defaults") or []
              if "hydra/sweeper/sampler" in str(d)]
    given = dict(sweeper.get("sampler") or {})
    if "_target_" in given:
        return given
    name = chosen[0] if chosen else "tpe"  # the plugin's default sampler
    if name not in SAMPLERS:
        raise UserError(f"{path}: sampler {name!r}: choose one of {', '.join(SAMPLERS)}")
    return {**SAMPLERS[name], **given}


def _params(params: dict, path, notes, config_keys) -> dict:
    out, known = {}, None
    for key, value in params.items():
        if key in KEYS:
            notes.append(f"params: {key} -> {KEYS[key]}")
            key = KEYS[key]
        known = known if known is not None else config_keys()
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
            notes.append(f"params: {key} is not a key of this config, left out"
                         + (f" (did you mean {close[0]}?)" if close else ""))
            continue
        out[key] = value
    if not out:
        raise UserError(f"{path}: none of its params is a key of this config (`--cfg` lists them)")
    return out


def multirun(overrides: list[str]) -> list[str]:
    """Hydra's ``-m``: the sweeping overrides (``a,b`` lists, ``choice()``, ``range()``,
    ``interval()``) become a sweep file of their own, and the overrides name it (``sweep=``).
    Lists and ranges only: a grid study of every point; an interval: a TPE study of
    ``hydra.sweeper.n_trials`` (20) trials. Its name is the sweep's hash, so the same command
    resumes the same study (everything a study has: MLflow parent run, status, workers)."""
    import hashlib
    import os
    from pathlib import Path

    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ValueType
    from omegaconf import OmegaConf

    settings = {"hydra.sweeper.n_trials": None, "hydra.sweeper.direction": "maximize",
                "optimized_metric": "val/accuracy"}
    params, rest, grid = {}, [], True
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as e:  # Hydra's grammar error, as one line
        raise UserError(f"-m: {str(e).splitlines()[0]}") from None
    for text, o in zip(overrides, parsed):
        value = text.split("=", 1)[1] if "=" in text else ""
        if o.key_or_group in settings:
            settings[o.key_or_group] = value
        elif o.is_sweep_override():
            simple = o.value_type == ValueType.SIMPLE_CHOICE_SWEEP
            params[o.key_or_group] = f"choice({value})" if simple else value
            grid = grid and o.value_type != ValueType.INTERVAL_SWEEP
        else:
            rest.append(text)
    if not params:
        raise UserError("-m sweeps over values such as optimizer.lr=1e-3,1e-2 or "
                        "'optimizer.lr=tag(log, interval(1e-4, 1e-2))': none was given")
    spec = {"objective": settings["optimized_metric"], "direction": settings["hydra.sweeper.direction"],
            "params": params}
    if grid and settings["hydra.sweeper.n_trials"] is None:
        spec["sampler"] = {"name": "grid"}
    else:
        spec["sampler"] = {"name": "tpe", "seed": 0}
        spec["n_trials"] = int(settings["hydra.sweeper.n_trials"] or 20)
    text = OmegaConf.to_yaml(OmegaConf.create(spec))
    work = next((o.split("=", 1)[1] for o in rest if o.startswith("work_dir=")), os.environ.get("FMNIST_SWEEP_DIR", "."))
    path = Path(work) / "multirun" / f"multirun-{hashlib.sha256(text.encode()).hexdigest()[:8]}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# Written by `python -m fmnist_sweep -m ...` from its sweeping overrides.\n" + text)
    return rest + [f"sweep={path.resolve()}"]
