"""Search spaces as data: hydra-optuna-sweeper's grammar, read by Hydra's own
override parser, turned into Optuna distributions and back into overrides."""

from __future__ import annotations

import hashlib
import json

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
from hydra.errors import HydraException
from optuna.distributions import (BaseDistribution, CategoricalDistribution, FloatDistribution,
                                  IntDistribution)

from .config import resource_dir
from .errors import UserError


def _distribution(key: str, text: str) -> BaseDistribution | str:
    """One params entry: a distribution, or (not a sweep) the fixed value as an override string."""
    try:
        override = OverridesParser.create().parse_override(f"{key}={text}")
    except HydraException as e:
        raise UserError(f"search space: cannot parse {key}: {text} ({str(e).splitlines()[0]}). "
                        "Use choice(...), range(a, b, step=s), interval(a, b), int(interval(a, b)) "
                        "or tag(log, interval(a, b)).") from None
    value = override.value()
    if not override.is_sweep_override():
        return override.get_value_element_as_str()
    if isinstance(value, ChoiceSweep) or (isinstance(value, RangeSweep) and value.shuffle):
        choices = sorted(override.sweep_iterator()) if isinstance(value, RangeSweep) else value.list
        if not choices or not all(isinstance(c, (str, int, float, bool)) for c in choices):
            raise UserError(f"search space: {key}: choice() needs plain values (str, int, float, bool)")
        return CategoricalDistribution(choices)
    if isinstance(value, RangeSweep):
        # Hydra's range() excludes its stop, like Python's; Optuna's high is inclusive.
        points = list(override.sweep_iterator())
        if not points:
            raise UserError(f"search space: {key}: {text} is empty")
        if all(isinstance(v, int) for v in (value.start, value.stop, value.step)):
            return IntDistribution(points[0], points[-1], step=int(value.step))
        return FloatDistribution(float(points[0]), float(points[-1]), step=float(value.step))
    if isinstance(value, IntervalSweep):
        log = "log" in value.tags
        lo, hi = value.start, value.end
        if lo is None or hi is None or not lo < hi or (log and lo <= 0):
            raise UserError(f"search space: {key}: {text} needs low < high" + (" and low > 0 for log" if log else ""))
        if isinstance(lo, int) and isinstance(hi, int):
            return IntDistribution(lo, hi, log=log)
        return FloatDistribution(float(lo), float(hi), log=log)
    raise UserError(f"search space: {key}: {text} is not a sweep Optuna can sample")


class SearchSpace:
    """The ``params`` block of a sweep: config-group choices first, then values.

    A value whose key is absent from the composed config of a trial (e.g.
    model.latent_dim when the trial's model is the cnn) is not suggested: that
    is how conditional parameters are written."""

    def __init__(self, params: dict[str, str]):
        self.text = {str(k): str(v) for k, v in params.items()}
        groups = {p.name for p in resource_dir("conf").iterdir() if p.is_dir()}
        self.groups, self.values, self.fixed = {}, {}, {}
        for key, text in self.text.items():
            dist = _distribution(key, text)
            if isinstance(dist, str):
                self.fixed[key] = dist
            elif key in groups:
                if not isinstance(dist, CategoricalDistribution):
                    raise UserError(f"search space: {key} is a config group: use choice(...) of its options")
                self.groups[key] = dist
            else:
                self.values[key] = dist

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.text, sort_keys=True).encode()).hexdigest()[:16]

    def grid(self) -> dict[str, list]:
        """The search space as GridSampler wants it (choices and ranges only)."""
        grid = {}
        for key, dist in {**self.groups, **self.values}.items():
            if isinstance(dist, CategoricalDistribution):
                grid[key] = list(dist.choices)
            elif dist.step is not None and not dist.log:
                n = int(round((dist.high - dist.low) / dist.step)) + 1
                grid[key] = [dist.low + i * dist.step for i in range(n)]
            else:
                raise UserError(f"the grid sampler needs choice() or range() for every parameter; {key} is "
                                f"{self.text[key]}")
        return grid

    def suggest(self, trial: optuna.Trial, compose_keys) -> list[str]:
        """Overrides for this trial. ``compose_keys(overrides)`` returns the keys present
        in the config composed with the group choices, to leave out inapplicable values."""
        overrides = [f"{k}={v}" for k, v in self.fixed.items() if "." not in k]
        for key, dist in self.groups.items():
            overrides.append(f"{key}={_format(_suggest(trial, key, dist))}")
        present = compose_keys(overrides) if self.values else set()
        overrides += [f"{k}={v}" for k, v in self.fixed.items() if "." in k]
        for key, dist in self.values.items():
            if key in present:
                overrides.append(f"{key}={_format(_suggest(trial, key, dist))}")
        return overrides


def _suggest(trial: optuna.Trial, key: str, dist: BaseDistribution):
    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(key, dist.choices)
    if isinstance(dist, IntDistribution):
        return trial.suggest_int(key, dist.low, dist.high, step=dist.step, log=dist.log)
    return trial.suggest_float(key, dist.low, dist.high, step=dist.step, log=dist.log)


def _format(value) -> str:
    if isinstance(value, float):
        return repr(value)  # shortest exact round trip
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)
