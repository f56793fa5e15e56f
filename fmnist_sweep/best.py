"""The best model in a wall-clock budget: plan, search, final models, registration.

    python -m fmnist_sweep +experiment=best budget.hours=2

One command measures this machine's training speed, splits the budget between a
multi-fidelity search (the sweep's Optuna study with its Hyperband pruner over epochs, on
a fraction of the data, one 1-thread worker per core) and the final models (the best
configuration retrained on train+val with ``budget.seeds`` seeds, as many at once as
there are cores, sized to end by the deadline), tests each final model once and registers
the best seed-0 model. Everything it decides and finishes is kept in the study's user
attributes (``budget.*``), so the same command resumes where it stopped, within what is
left of the budget. Deadlines reach the training runs as ``trainer.deadline``."""

from __future__ import annotations

import json
import math
import os
import statistics
import threading
import time

from .best_plan import SESSION_SETUP, Plan, measure, minimum_budget, plan_final, plural, waves
from .config import budget_seconds, compose
from .errors import UserError

MARGIN = "budget.margin_s"  # seconds kept back for start-up, registration and the report
WIDTH = "budget.width"  # the model.widths override the first session chose ("" for the configured widths)
# A narrower model where the configured one's final models would train fewer epochs: accuracy
# climbs steeply over the first epochs (docs/RESULTS.md, the 15-minute budget on an AVX2 CPU).
FINAL_EPOCHS = 5


class Clock:
    """The budget's seconds spent over every session of the command, saved in the study's
    user attributes every few seconds (a daemon thread) and at each phase's end; with it
    the study's parent run logs the time left and the best validation accuracy so far."""

    def __init__(self, study, total: float, started: float, every: float = 10.0):
        self.study, self.total, self.every = study, total, every
        self.before = float(study.optuna.user_attrs.get("budget.spent", 0.0))
        self.t0 = started
        self._stop = threading.Event()

    def spent(self) -> float:
        return self.before + time.time() - self.t0

    def left(self) -> float:
        return self.total - self.spent()

    def deadline(self, seconds: float) -> float:
        """The Unix time ``seconds`` from now, capped at the budget's end."""
        return time.time() + min(seconds, self.left())

    def save(self) -> None:
        spent = self.spent()
        self.study.optuna.set_user_attr("budget.spent", spent)
        metrics = {"budget/seconds_left": max(0.0, self.total - spent)}
        best = self.study.best_trials()
        if best:
            metrics["budget/best_val_accuracy"] = best[0].value
        self.study.tracker.log(self.study.parent_run_id, metrics, step=int(spent))

    def __enter__(self):
        def beat():
            while not self._stop.wait(self.every):
                try:
                    self.save()
                except Exception:  # a busy or lost store: the next beat or the phase's end saves it
                    pass
        threading.Thread(target=beat, daemon=True, name="budget-clock").start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        try:
            self.save()
        except Exception:
            pass


def run(cfg, overrides: list[str], started: float) -> int:
    """The whole command, its clock running since ``started`` (Unix time): plan, search,
    final models, registration, report; the exit code."""
    from .study import Study

    total = budget_seconds(cfg)
    if cfg.sweep is None:
        raise UserError("a time budget needs a search: use +experiment=best budget.hours=H")
    cores = sorted(os.sched_getaffinity(0))
    speed, chosen = None, _chosen_width(cfg)
    if chosen is None:  # a first session: a budget below this machine's minimum starts nothing
        chosen, speed = _fit(cfg, overrides, cores, total, started)
    if chosen:
        overrides = [*overrides, chosen]
        cfg = compose(overrides)
    study = Study(cfg, overrides)
    study.optuna.set_user_attr(WIDTH, chosen)
    attrs = study.optuna.user_attrs
    if attrs.get("budget.registered"):
        print(f"study {study.name}: done, nothing left to run (to start afresh: study.name=NEW)")
        print(report(study, attrs), end="")
        return 0
    with Clock(study, total, started) as clock:
        print(f"budget {_hm(total)}: {_hm(clock.spent())} already spent, {_hm(clock.left())} left", flush=True)
        speed = speed or _measure(cfg, cores, _probe(total))
        plan = Plan(total, clock.left(), cores, speed, cfg, attrs)
        print(plan.text(), flush=True)
        for key, value in (("budget.total", total), ("budget.search_seconds", plan.search_seconds),
                           (MARGIN, plan.margin)):
            if key == "budget.total" or key not in attrs:  # a resumed run keeps the first split
                study.optuna.set_user_attr(key, value)
        study.tracker.log(study.parent_run_id, {}, tags={"budget.plan": plan.text()[:5000]})
        _phase(study, clock, "search", lambda: search(study, clock, plan, overrides))
        _phase(study, clock, "final", lambda: final(study, clock, plan))
        _phase(study, clock, "register", lambda: register(study))
    print(report(study, study.optuna.user_attrs), end="")
    return 0


def _chosen_width(cfg) -> str | None:
    """A resumed session's model width, as the first session chose it ("" for the configured
    one); None for a first session (no such study in the storage yet)."""
    import optuna

    from .storage import make_storage, sqlite_path
    from .sweep import load_sweep

    path = sqlite_path(str(cfg.storage.get("url") or cfg.storage.get("path")))
    if path is not None and not path.exists():
        return None
    name = cfg.study.name or load_sweep(cfg.sweep).name
    try:
        return optuna.load_study(study_name=name, storage=make_storage(cfg.storage)).user_attrs.get(WIDTH, "")
    except KeyError:  # no such study
        return None


def _widths(cfg, overrides: list[str]) -> list[str]:
    """The model widths a first session may choose, widest first: the configured one (""), then
    the model's widths halved and quartered; only the configured one where the command sets them."""
    widths = cfg.model.get("widths")
    if widths is None or any(o.lstrip("+").startswith("model.widths=") for o in overrides):
        return [""]
    return [""] + [f"model.widths=[{','.join(str(max(4, w // k)) for w in widths)}]" for k in (2, 4)]


def _fit(cfg, overrides: list[str], cores: list[int], total: float, started: float) -> tuple[str, dict]:
    """The model width the budget buys on this machine, and its measured speed: the widest whose
    plan trains the final models for FINAL_EPOCHS, else the one whose plan trains them longest;
    below the narrowest one's smallest plan, a UserError naming that minimum."""
    fitting, speed = [], None  # (final epochs, width, speed), widest first
    for width in _widths(cfg, overrides):
        c = compose([*overrides, width]) if width else cfg
        # Short probes, only to choose (the final phase measures its model again); a narrower
        # width shares the first one's process start-up and slowdown side by side.
        speed = _measure(c, cores, min(_probe(total), 1.5), like=speed)
        spent = time.time() - started + SESSION_SETUP  # (the study is created after the choice)
        minimum = minimum_budget(c, speed, cores, spent)
        if total >= minimum:
            fitting.append((Plan(total, total - spent, cores, speed, c, {}).final_epochs, width, speed))
            if fitting[-1][0] >= FINAL_EPOCHS:
                break
    if not fitting:
        raise UserError(f"budget {_hm(total)} is below the smallest plan on this machine, "
                        f"{_hm(minimum)}: run with budget.minutes={math.ceil(minimum / 6) / 10:g} or more")
    epochs, width, speed = max(fitting, key=lambda f: f[0])  # the widest of equals: max keeps the first
    if width:
        print(f"{width}: the final models train {plural(epochs, 'epoch')} at this width, fewer at the configured one",
              flush=True)
    return width, speed


def _measure(cfg, cores: list[int], seconds: float, like: dict | None = None) -> dict:
    """This machine's speed for the search's model, as many runs at once as cores (best_plan.measure)."""
    return measure(cfg, [t for _, t in waves(cfg.budget.seeds, len(cores))], seconds, len(cores), like)


def _phase(study, clock: Clock, name: str, work) -> None:
    """Run a phase unless the study marks it done (budget.phase.NAME.done); its seconds add to budget.phase.NAME."""
    key = f"budget.phase.{name}"
    if study.optuna.user_attrs.get(f"{key}.done"):
        print(f"{name}: done in an earlier session", flush=True)
        return
    study.tracker.log(study.parent_run_id, {}, tags={"budget.phase": name})
    t0 = time.time()
    try:
        work()
    finally:
        study.optuna.set_user_attr(key, float(study.optuna.user_attrs.get(key, 0.0)) + time.time() - t0)
        clock.save()
    study.optuna.set_user_attr(f"{key}.done", True)


def search(study, clock: Clock, plan: Plan, overrides: list[str]) -> None:
    """The study's trials on one worker per GPU, else one 1-thread worker per core, until the
    search's deadline."""
    from .workers import launch

    seconds = plan.search_seconds - float(study.optuna.user_attrs.get("budget.phase.search", 0.0))
    if seconds < plan.min_trial_seconds:
        print("search: no time left for a trial; the final models take the best so far", flush=True)
        return
    deadline = clock.deadline(seconds)
    print(f"search: until {_clock(deadline)}, {plan.workers} workers", flush=True)
    os.environ["FMNIST_DEADLINE"] = f"{deadline:.0f}"
    try:
        line = [o for o in overrides if not o.startswith(("budget.", "study.n_trials="))]
        launch(study.cfg, line + [f"study.name={study.name}"], plan.workers, 1, None)
    finally:
        del os.environ["FMNIST_DEADLINE"]
    if not study.best_trials():
        print("search: no trial finished within its share of the budget; the final models take the sweep's "
              "first configuration", flush=True)


def final(study, clock: Clock, plan: Plan) -> None:
    """The best trial's configuration on train+val, one run per seed, sized to the time left."""
    from .best_final import final_line, run_waves

    attrs = study.optuna.user_attrs
    if "budget.final.trial" not in attrs:
        trial = _chosen(study)
        # Sized with the chosen configuration's own speed (its batch size) on all the images.
        plan.speed = measure(compose(final_line(trial, 1)), [t for _, t in plan.waves], _probe(plan.total),
                             plan.waves[0][0])
        epochs = plan_final(plan, clock.left() - plan.margin)
        if epochs < 1:
            raise UserError(f"no time left for the final models ({_hm(clock.left())} left): raise the budget")
        study.optuna.set_user_attr("budget.final.trial", trial.number)
        study.optuna.set_user_attr("budget.final.epochs", epochs)
        attrs = study.optuna.user_attrs
    trial = study.optuna.trials[attrs["budget.final.trial"]]
    val = f"val {trial.value:.4f}" if trial.value is not None else "not finished in the search"
    print(f"final: trial {trial.number} ({val}) on train+val for "
          f"{attrs['budget.final.epochs']} epochs, seeds 0..{plan.seeds - 1}; "
          f"{_hm(clock.left())} left", flush=True)
    run_waves(study, trial, attrs["budget.final.epochs"], plan, clock.deadline(clock.left() - 0.5 * plan.margin))


def _chosen(study):
    """The search's best trial; without a finished one, the first trial (the sweep's first
    enqueued configuration) that started."""
    best = study.best_trials()
    if best:
        return best[0]
    started = [t for t in study.optuna.get_trials(deepcopy=False) if "overrides" in t.user_attrs]
    if not started:
        raise UserError("the search started no trial within its share of the budget: raise budget.hours "
                        "or budget.search_share")
    return started[0]


def register(study) -> None:
    """The final models' mean ± std on the parent run, and the model of the lowest finished seed
    (seed 0 unless the deadline cut it) as a registry version."""
    from . import finalize

    attrs = study.optuna.user_attrs
    seeds = finals(attrs)
    done = [s for s in seeds if s.get("test") is not None]
    if not done:
        raise UserError("no final model finished within the budget: raise budget.hours")
    values = [s["test"] for s in done]
    best = {"trial": attrs["budget.final.trial"], "mean": statistics.mean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "models": [s["model_id"] for s in done], "runs": [s["run_id"] for s in done]}
    version = finalize.register(study, best)
    study.optuna.set_user_attr("budget.registered", f"{version.name}/{version.version}")
    study.tracker.log(study.parent_run_id, {"final/accuracy_mean": best["mean"], "final/accuracy_std": best["std"]},
                      tags={"final.registered_model": f"{version.name}/{version.version}"})
    from .best_final import plot_progress

    plot_progress(study)


def finals(attrs: dict) -> list[dict]:
    """The final runs recorded so far, by seed."""
    return sorted((json.loads(v) for k, v in attrs.items() if k.startswith("budget.final.seed.")),
                  key=lambda s: s["seed"])


def report(study, attrs: dict) -> str:
    """Per-phase wall times, the seeds' test accuracies, mean ± std and the registered model."""
    lines = [f"\n# Best model of study `{study.name}` in a budget of {_hm(float(attrs.get('budget.total', 0)))}"
             if attrs.get("budget.total") else f"\n# Best model of study `{study.name}`", ""]
    for name in ("search", "final", "register"):
        if f"budget.phase.{name}" in attrs:
            lines.append(f"- {name}: {_hm(float(attrs[f'budget.phase.{name}']))}")
    lines.append(f"- spent in all: {_hm(float(attrs.get('budget.spent', 0.0)))}")
    seeds = finals(attrs)
    for s in seeds:
        shown = f"test accuracy {s['test']:.4f}" if s.get("test") is not None else s.get("status", "?")
        lines.append(f"- seed {s['seed']}: {shown} (run {s['run_id']})")
    values = [s["test"] for s in seeds if s.get("test") is not None]
    if values:
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        lines.append(f"- test accuracy: {statistics.mean(values):.4f} ± {std:.4f} over {plural(len(values), 'seed')}")
    if attrs.get("budget.registered"):
        uri = f"models:/{attrs['budget.registered']}"
        lines.append(f"- registered: {uri} (python -m fmnist_sweep predict {uri} IMAGES)")
    return "\n".join(lines) + "\n"


def _probe(total: float) -> float:
    """Seconds of training batches per speed measurement: up to 6 for a budget of hours (the final
    models' epochs are sized with it), less for a budget of minutes."""
    return min(6.0, total / 200)


def _hm(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _clock(unix: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(unix))

