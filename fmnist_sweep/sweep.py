"""A study's definition (sweeps/NAME.yaml) and the Optuna sampler and pruner it names."""

from __future__ import annotations

import difflib
import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import optuna
from hydra.utils import instantiate
from omegaconf import OmegaConf

from .config import resource_dir
from .errors import UserError
from .hydra_sweeper import is_plugin_file, translate
from .space import SearchSpace

# Metrics a trial can be judged on: per epoch (pruning reads these) and at the end.
EPOCH_METRICS = ("val/accuracy", "val/loss", "train/loss", "perf/images_per_s", "perf/epoch_seconds")
FINAL_METRICS = EPOCH_METRICS + ("model/n_params", "perf/train_seconds")

SAMPLERS = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler,
            "grid": optuna.samplers.GridSampler, "cmaes": optuna.samplers.CmaEsSampler,
            "gp": optuna.samplers.GPSampler, "nsga2": optuna.samplers.NSGAIISampler}
PRUNERS = {"median": optuna.pruners.MedianPruner, "percentile": optuna.pruners.PercentilePruner,
           "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
           "hyperband": optuna.pruners.HyperbandPruner, "none": optuna.pruners.NopPruner}


@dataclass
class Sweep:
    """One sweeps/NAME.yaml."""

    name: str
    objectives: list[tuple[str, str]]  # (metric, "maximize" | "minimize")
    n_trials: int
    space: SearchSpace
    sampler: dict = field(default_factory=lambda: {"name": "tpe"})
    pruner: dict = field(default_factory=lambda: {"name": "none"})
    enqueue: list = field(default_factory=list)
    max_failures: int | None = None

    @property
    def fingerprint(self) -> str:
        text = repr((self.objectives, self.space.fingerprint()))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def sweep_names() -> list[str]:
    return sorted(p.stem for p in resource_dir("sweeps").glob("*.yaml"))


def load_sweep(name: str) -> Sweep:
    """sweeps/NAME.yaml, or any YAML file given by its path (sweep=path/to/mine.yaml)."""
    if name.endswith((".yaml", ".yml")):
        path = Path(name).expanduser()
        if not path.is_file():
            raise UserError(f"sweep file {path} does not exist")
        name = path.stem
    else:
        path = resource_dir("sweeps") / f"{name}.yaml"
    if not path.is_file():
        close = difflib.get_close_matches(name, sweep_names(), n=1)
        raise UserError(f"unknown sweep '{name}'. Choose one of: {', '.join(sweep_names())}."
                        + (f" Did you mean {close[0]}?" if close else ""))
    spec = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    if is_plugin_file(spec):
        spec = translate(spec, path, FINAL_METRICS, _config_keys)
    known = {"objective", "direction", "objectives", "n_trials", "sampler", "pruner", "params", "enqueue",
             "max_failures"}
    unknown = set(spec) - known
    if unknown:
        raise UserError(f"{path}: unknown keys {sorted(unknown)}; allowed: {sorted(known)}")
    if "objectives" in spec:
        objectives = [(o["metric"], o.get("direction", "maximize")) for o in spec["objectives"]]
    else:
        objectives = [(spec.get("objective", "val/accuracy"), spec.get("direction", "maximize"))]
    for metric, direction in objectives:
        if metric not in FINAL_METRICS:
            raise UserError(f"{path}: unknown objective metric '{metric}'. Choose from: {', '.join(FINAL_METRICS)}.")
        if direction not in ("maximize", "minimize"):
            raise UserError(f"{path}: direction of {metric} must be maximize or minimize, not {direction!r}")
    if len(objectives) == 1 and objectives[0][0] not in EPOCH_METRICS and spec.get("pruner", {}).get("name", "none") != "none":
        raise UserError(f"{path}: pruning needs a per-epoch objective ({', '.join(EPOCH_METRICS)})")
    if len(objectives) > 1 and spec.get("pruner", {}).get("name", "none") != "none":
        raise UserError(f"{path}: Optuna cannot prune multi-objective studies: set pruner: {{name: none}}")
    space = SearchSpace(spec.get("params") or {})
    n_trials = spec.get("n_trials")
    if n_trials is None and (spec.get("sampler") or {}).get("name") == "grid":
        n_trials = math.prod(len(v) for v in space.grid().values())  # the whole grid, once
    if not isinstance(n_trials, int) or n_trials < 1:
        raise UserError(f"{path}: n_trials must be an integer >= 1")
    return Sweep(name, objectives, n_trials, space,
                 spec.get("sampler") or {"name": "tpe"}, spec.get("pruner") or {"name": "none"},
                 spec.get("enqueue") or [], spec.get("max_failures"))


def _config_keys() -> set[str]:
    """Every key a trial's config can have: the config groups, and each model's keys."""
    from .config import compose, flat_keys, group_options

    keys = {p.name for p in resource_dir("conf").iterdir() if p.is_dir()}
    for model in group_options("model"):
        keys |= set(flat_keys(compose([f"model={model}"])))
    return keys


def _build(spec: dict, table: dict, kind: str, **extra):
    """A sampler or pruner from a spec: its ``name`` in ``table``, or any ``_target_``."""
    spec = dict(spec)
    if "_target_" in spec:
        return instantiate(spec, **extra)
    name = spec.pop("name", None)
    if name not in table:
        raise UserError(f"unknown {kind} '{name}'. Choose one of: {', '.join(table)} (or give _target_).")
    return table[name](**extra, **spec)


def make_sampler(sweep: Sweep, seed: int):
    """The sweep's sampler, seeded per worker unless all workers must share its seed."""
    spec = {"seed": seed, **sweep.sampler}

    def build(seed):
        if spec.get("name") == "grid":  # its search space comes from the sweep's params
            return optuna.samplers.GridSampler(sweep.space.grid(), **{k: v for k, v in spec.items()
                                                                      if k not in ("name", "seed")}, seed=seed)
        return _build({**spec, "seed": seed}, SAMPLERS, "sampler")

    sampler = build(spec.get("seed"))  # a bad sampler spec is an error now, not at the first trial
    if spec.get("seed") is None or isinstance(sampler, SHARED_SEED):
        return sampler
    return WorkerSeededSampler(build, spec["seed"])


# Samplers whose workers coordinate through the study and need one seed in all of them:
# the grid's seed orders the grid (trial k runs point k), QMC's scrambles its sequence.
SHARED_SEED = (optuna.samplers.GridSampler, optuna.samplers.QMCSampler)


class WorkerSeededSampler(optuna.samplers.BaseSampler):
    """A seeded sampler that draws a different sequence in each worker of a study.

    Every worker builds its sampler from the same spec; with one seed they would draw the
    same points in lockstep, and a resumed study would draw its first points again. This
    builds the real sampler at the worker's first trial, seeded with seed + that trial's
    number: unique per worker, and reproducible (a one-worker study on a fresh storage
    draws what the plain seeded sampler draws). Not for SHARED_SEED samplers."""

    def __init__(self, build, seed: int):
        self._build, self._seed, self._sampler = build, seed, None

    def _base(self, trial=None) -> optuna.samplers.BaseSampler:
        if self._sampler is None:
            self._sampler = self._build(self._seed + (trial.number if trial is not None else 0))
        return self._sampler

    @property
    def base(self) -> optuna.samplers.BaseSampler:
        """The sampler that draws (the sweep's sampler, seeded for this worker)."""
        return self._base()

    def before_trial(self, study, trial) -> None:
        self._base(trial).before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):
        return self._base(trial).infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._base(trial).sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._base(trial).sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values) -> None:
        self._base(trial).after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._base().reseed_rng()


def make_pruner(sweep: Sweep, epochs: int):
    """The sweep's pruner (hyperband's max resource: the trainer's epochs)."""
    spec = dict(sweep.pruner)
    if spec.get("name") == "hyperband":
        spec.setdefault("max_resource", epochs)
    if spec.get("name") == "percentile":
        spec.setdefault("percentile", 25.0)  # prune below the best quarter's level
    return _build(spec, PRUNERS, "pruner")
