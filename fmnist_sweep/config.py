"""Compose a run's configuration with Hydra and reject bad values before any work."""

from __future__ import annotations

import copy
import difflib
import functools
import hashlib
import re
from pathlib import Path

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import OverrideType
from hydra.errors import ConfigCompositionException, HydraException, MissingConfigException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from .errors import UserError

_PKG = Path(__file__).resolve().parent


def resource_dir(name: str) -> Path:
    """conf/ or sweeps/: inside the installed package (wheel), else at the repository top."""
    for d in (_PKG / name, _PKG.parent / name):
        if d.is_dir():
            return d
    raise UserError(f"cannot find the {name}/ folder next to {_PKG}: reinstall fmnist-sweep")


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (resource_dir("conf") / group).glob("*.yaml"))


def flat_keys(cfg, prefix="") -> list[str]:
    """Every leaf key of ``cfg`` as a dotted path (``model.latent_dim``)."""
    keys = []
    for k, v in cfg.items():
        full = f"{prefix}{k}"
        keys.append(full)
        if isinstance(v, DictConfig):
            keys += flat_keys(v, full + ".")
    return keys


def _explain(err: Exception, overrides: list[str]) -> str:
    """One or two lines for a Hydra composition error, with the closest valid name."""
    msg = str(err)
    m = re.search(r"Could not find '([^/']+)/([^']+)'", msg)
    if m:
        group, option = m.groups()
        options = group_options(group)
        close = difflib.get_close_matches(option, options, n=1)
        hint = f" Did you mean {group}={close[0]}?" if close else ""
        return f"unknown {group} option '{option}'. Choose one of: {', '.join(options)}.{hint}"
    m = re.search(r"Could not override '([^']+)'", msg) or re.search(r"Key '([^']+)' is not in struct", msg)
    if m:
        key = m.group(1)
        try:
            base = compose([o for o in overrides if not o.lstrip("+~").startswith(key + "=")])
            close = difflib.get_close_matches(key, flat_keys(base), n=1)
        except UserError:
            close = []
        hint = f" Did you mean '{close[0]}'?" if close else " Print the valid keys with --cfg."
        return f"unknown config key '{key}'.{hint}"
    first = msg.strip().splitlines()[0] if msg.strip() else type(err).__name__
    return f"bad override: {first}"


def _hydra_whole(overrides: list[str]) -> DictConfig:
    """Hydra's composition of conf/config.yaml with these overrides, unresolved."""
    with initialize_config_dir(config_dir=str(resource_dir("conf")), version_base="1.3", job_name="fmnist_sweep"):
        return hydra_compose(config_name="config", overrides=overrides)


@functools.lru_cache(maxsize=32)
def _from_groups(group_overrides: tuple[str, ...]) -> DictConfig:
    return _hydra_whole(list(group_overrides))


def _hydra(overrides: list[str]) -> DictConfig:
    """Hydra's composition, unresolved. Hydra builds the config from the line's config-group
    choices (``model=cnn``, ``+experiment=x``: the defaults list), then applies the value changes
    (``optimizer.lr=0.01``) in order, each with OmegaConf.update(merge=True). A study's trials
    differ mostly in values, so the first part is cached per distinct group choices and the
    changes are applied to a copy the same way. A line with anything else beside its groups
    (``+key``, ``++key``, ``~key``, ``@package``, a sweep, ``hydra.*``) goes to Hydra whole."""
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException:
        return _hydra_whole(overrides)  # Hydra's own message for the bad syntax
    conf, groups, changes = resource_dir("conf"), [], []
    for o in parsed:  # Hydra's test of a group choice (its defaults list's): a group that exists, given a name
        (groups if (conf / o.key_or_group).is_dir() and not isinstance(o.value(), dict) else changes).append(o)
    if any(o.type != OverrideType.CHANGE or o.package is not None or o.is_sweep_override() or o.is_hydra_override()
           for o in changes):
        return _hydra_whole(overrides)
    cfg = copy.deepcopy(_from_groups(tuple(o.input_line for o in groups)))
    for o in changes:  # as Hydra's own application of a change
        try:
            OmegaConf.update(cfg, o.key_or_group, o.value(), merge=True)
        except (ConfigAttributeError, ConfigKeyError) as e:
            raise ConfigCompositionException(f"Could not override '{o.key_or_group}'.\nTo append to your config "
                                             f"use +{o.input_line}") from e
        except OmegaConfBaseException as e:
            raise ConfigCompositionException(f"Error merging override {o.input_line}") from e
    return cfg


def compose(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """The resolved run configuration for these command-line overrides."""
    overrides = list(overrides)
    preset = next((o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0] == "budget" and "=" in o), None)
    if preset is not None and not preset.startswith("{"):
        raise UserError(f"budget={preset}: budget is a time budget (budget.hours=H or budget.minutes=M, with "
                        f"+experiment=best); a study's epochs preset is schedule={preset}.")
    try:
        cfg = _hydra(overrides)
    except (HydraException, MissingConfigException, ValueError) as e:
        raise UserError(_explain(e, overrides)) from None
    schedules = cfg.get("schedules")
    if schedules is not None and cfg.get("schedule") not in schedules:
        raise UserError(f"schedule={cfg.get('schedule')!r} is not one of this experiment's schedules: "
                        f"{', '.join(schedules)}.")
    try:
        OmegaConf.resolve(cfg)
    except Exception as e:  # interpolation errors from omegaconf
        raise UserError(f"cannot resolve the configuration: {str(e).splitlines()[0]}") from None
    validate(cfg)
    return cfg


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _seconds(v) -> bool:
    try:
        return float(v) > 0
    except (TypeError, ValueError):
        return False


def _each(v):
    return list(v) if OmegaConf.is_list(v) or isinstance(v, (list, tuple)) else [v]


# key -> (test on the value, what is allowed). Keys absent from a config are skipped.
RULES = {
    "optimizer.lr": (lambda v: _number(v) and v > 0, "a number > 0"),
    "optimizer.weight_decay": (lambda v: _number(v) and v >= 0, "a number >= 0"),
    "optimizer.momentum": (lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "model.dropout": (lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "model.dropouts": (lambda v: all(_number(p) and 0 <= p < 1 for p in _each(v)),
                       "a number or a list of numbers in [0, 1)"),
    "model.dense_dropout": (lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "model.latent_dim": (lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
    "model.widths": (lambda v: all(isinstance(w, int) and w >= 1 for w in _each(v)), "integers >= 1"),
    "model.hidden": (lambda v: all(isinstance(w, int) and w >= 1 for w in _each(v)), "integers >= 1"),
    "model.dense": (lambda v: all(isinstance(w, int) and w >= 1 for w in _each(v)), "integers >= 1"),
    "model.activation": (lambda v: v in ("tanh", "relu", "gelu", "silu"), "tanh, relu, gelu or silu"),
    "model.output_activation": (lambda v: v in ("sigmoid", "relu"), "sigmoid or relu"),
    "trainer.epochs": (lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
    "trainer.batch_size": (lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
    "trainer.eval_batch_size": (lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
    "trainer.lr_schedule": (lambda v: v in ("constant", "onecycle", "cosine"), "constant, onecycle or cosine"),
    "trainer.augment.shift": (lambda v: isinstance(v, int) and 0 <= v <= 8, "an integer in [0, 8]"),
    "trainer.augment.flip": (lambda v: isinstance(v, bool), "true or false"),
    "trainer.augment.erase": (lambda v: _number(v) and 0 <= v <= 1, "a probability in [0, 1]"),
    "trainer.eval_flip": (lambda v: isinstance(v, bool), "true or false"),
    "trainer.test_shift": (lambda v: isinstance(v, int) and 0 <= v <= 4, "an integer in [0, 4]"),
    "trainer.ema": (lambda v: v is None or (_number(v) and 0 < v < 1), "null or a decay in (0, 1), such as 0.999"),
    "model.blocks": (lambda v: all(isinstance(b, int) and b >= 1 for b in _each(v)), "integers >= 1"),
    "model.label_smoothing": (lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "trainer.compile": (lambda v: v in (None, "default", "reduce-overhead", "max-autotune"),
                        "null, default, reduce-overhead or max-autotune"),
    "trainer.precision": (lambda v: v in ("auto", "fp32", "bf16"), "auto, fp32 or bf16"),
    "study.checkpoints": (lambda v: v in ("delete", "keep", "off"), "delete, keep or off"),
    "tracking.log_models": (lambda v: v in ("best", "all", "none"), "best, all or none"),
    "tracking.plots": (lambda v: isinstance(v, bool), "true or false"),
    "trainer.device": (lambda v: isinstance(v, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", v) is not None,
                       "auto, cpu, cuda or cuda:N"),
    "trainer.threads": (lambda v: v == "auto" or (isinstance(v, int) and v >= 1), "auto or an integer >= 1"),
    "trainer.channels_last": (lambda v: v in ("auto", True, False), "auto, true or false"),
    "trainer.early_stopping_patience": (lambda v: v is None or (isinstance(v, int) and v >= 1),
                                        "null or an integer >= 1"),
    "data.val_fraction": (lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1) (0: train on all 60k)"),
    "data.train_fraction": (lambda v: _number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "data.test_fraction": (lambda v: _number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "seed": (lambda v: isinstance(v, int), "an integer"),
    "trainer.deadline": (lambda v: v is None or _seconds(v), "null or a Unix time in seconds"),
    "budget.hours": (lambda v: v is None or (_number(v) and v > 0), "null or a number of hours > 0"),
    "budget.minutes": (lambda v: v is None or (_number(v) and v > 0), "null or a number of minutes > 0"),
    "budget.search_share": (lambda v: _number(v) and 0 <= v < 1, "a share of the budget in [0, 1)"),
    "budget.seeds": (lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
}


def validate(cfg: DictConfig) -> None:
    """Raise UserError naming the first bad key and what it allows."""
    for key, (ok, allowed) in RULES.items():
        node = OmegaConf.select(cfg, key, default="<absent>")
        if node == "<absent>":
            continue
        value = OmegaConf.to_object(node) if OmegaConf.is_config(node) else node
        if not ok(value):
            raise UserError(f"{key}={value!r} is not allowed: {key} must be {allowed}.")
    if cfg.get("trainer") and cfg.trainer.get("early_stopping_patience") and cfg.data.val_fraction == 0:
        raise UserError("trainer.early_stopping_patience needs a validation split: data.val_fraction > 0.")
    widths, drops = OmegaConf.select(cfg, "model.widths"), OmegaConf.select(cfg, "model.dropouts")
    if widths is not None and OmegaConf.is_list(drops) and len(widths) != len(drops):
        raise UserError(f"model.widths has {len(widths)} entries but model.dropouts has {len(drops)}: "
                        "give one dropout per block.")
    blocks = OmegaConf.select(cfg, "model.blocks")
    if widths is not None and OmegaConf.is_list(blocks) and len(widths) != len(blocks):
        raise UserError(f"model.widths has {len(widths)} entries but model.blocks has {len(blocks)}: "
                        "give one block count per stage.")


def budget_seconds(cfg) -> float | None:
    """The command's time budget in seconds (budget.hours and/or budget.minutes), None without one."""
    b = cfg.get("budget") or {}
    if b.get("hours") is None and b.get("minutes") is None:
        return None
    return 3600.0 * (b.get("hours") or 0) + 60.0 * (b.get("minutes") or 0)


def config_fingerprint(cfg: DictConfig) -> str:
    """What decides a trial's result: the config without where-and-how-it-runs keys."""
    c = OmegaConf.to_container(cfg, resolve=True)
    for key in ("work_dir", "tracking", "storage", "sweep", "study", "budget", "schedule", "schedules"):
        c.pop(key, None)
    for key in ("root", "cache_dir", "download", "mirror"):
        c["data"].pop(key, None)
    for key in ("progress", "threads", "eval_batch_size", "deadline"):
        c["trainer"].pop(key, None)
    return hashlib.sha256(OmegaConf.to_yaml(OmegaConf.create(c)).encode()).hexdigest()[:16]
