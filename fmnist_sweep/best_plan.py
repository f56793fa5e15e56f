"""How +experiment=best spends its budget: this machine's training speed, measured in a
few seconds, and from it the search's share, its trials and the final models' epochs."""

from __future__ import annotations

import math
import queue
import statistics
import time

import torch
from omegaconf import OmegaConf

from . import data as fmnist
from . import forks, hardware, train

# Costs the speed measurement does not see, each read off past runs' MLflow records (docs/PERFORMANCE.md):
TRIAL_OVERHEAD = 3.0   # s per trial beside its epochs: a trial's perf/train_seconds minus its epochs' perf/epoch_seconds
RECORD_OVERHEAD = 5.0  # s per final run beside its start-up, epochs and test: its MLflow run, artifacts and Model
EPOCH_OVERHEAD = 0.25  # s per epoch beside its images: perf/epoch_seconds minus images / the measured images/s
PRUNED_SHARE = 0.45    # epochs Hyperband's trials train, as a share of the longest trial's: sum of last_step / (trials x epochs)
# and each read off a session's printed lines and their clock times (docs/PERFORMANCE.md):
SESSION_SETUP = 10.0   # s from a first session's width line to its budget line: its study and MLflow parent run
WORKER_START = 6.0     # s from "search: until" to a worker's first line: its config composed, study and MLflow opened
SEARCH_END = 15.0      # s from the search's deadline to the "study ..." line: running trials stopped, the report


def _speed(b: train.Built, threads: int, seconds: float, ready=lambda: None) -> dict:
    """Training and evaluation images/s of a built run with ``threads`` threads: a warm-up
    batch, ``ready()``, then training batches for about ``seconds``, then a warm-up evaluation batch
    and a flip-averaged evaluation of whole batches."""
    torch.set_num_threads(threads)
    tcfg, gen = b.cfg.trainer, torch.Generator().manual_seed(0)
    augment = train.augment_args(tcfg)
    x, y = b.data.train.x, b.data.train.y
    batch = fmnist.Split(x[:tcfg.batch_size], y[:tcfg.batch_size])

    def step() -> None:
        train.train_epoch(b.model, b.optimizer, batch, tcfg.batch_size, gen, b.autocast, b.channels_last,
                          lambda *_: None, None, augment)

    step()  # warm-up: first-call allocations and kernel choices
    ready()
    n, t0 = 0, time.perf_counter()
    while n == 0 or time.perf_counter() - t0 < seconds:
        step()
        n += len(batch)
    train_ips = n / (time.perf_counter() - t0)
    size = min(tcfg.eval_batch_size, 512)
    n = 512 - 512 % size  # whole evaluation batches of training images (never the test split)
    part = fmnist.Split(x[:n], y[:n])
    train.evaluate(b.model, fmnist.Split(x[:size], y[:size]), size, b.autocast, b.channels_last)  # warm-up: one batch
    t0 = time.perf_counter()
    train.evaluate(b.model, part, tcfg.eval_batch_size, b.autocast, b.channels_last, flip=tcfg.eval_flip)
    return {"train": train_ips, "eval": len(part) / (time.perf_counter() - t0)}


def measure(cfg, threads: list[int], seconds: float = 2.0, at_once: int = 1, like: dict | None = None) -> dict:
    """Images/s of ``cfg``'s model on this machine for each thread count, with the allocator
    settings the runs train with; the slowdown of ``at_once`` 1-thread runs side by side on a
    CPU (shared caches and memory, and cores that may be hyperthreads of one); the start-up of a
    run's process (those runs' own, forked as the runs are: forks.py); the splits' sizes; the measurement's
    seconds. ``like``: a measurement of a similar model whose slowdown and start-up are taken as
    they are (the side-by-side processes not started again)."""
    if like is None:
        forks.warm()  # paid once per command: the start-ups measured and planned are a warm server's forks
    t0 = time.perf_counter()
    hardware.keep_freed_memory()
    b = train.build(cfg)
    speed = {k: _speed(b, k, seconds) for k in sorted(set(threads) | {1})}
    torch.set_num_threads(hardware.threads_for("auto"))
    k = at_once if b.device.type == "cpu" else 1
    if like is not None:
        slowdown, startup = like["slowdown"], like["startup"]
    else:
        at_once_speed, startup = side_by_side(cfg, k, seconds)
        slowdown = max(1.0, speed[1]["train"] / at_once_speed) if k > 1 else 1.0
    n_all = round(len(b.data.train) / cfg.data.train_fraction) + len(b.data.val)  # the final models' images
    return {"threads": speed, "slowdown": slowdown, "at_once": at_once, "startup": startup,
            "n_train": len(b.data.train), "n_val": len(b.data.val), "n_all": n_all, "n_test": len(b.data.test),
            # (what measuring it whole takes: a like-measured one counts its model's side-by-side runs)
            "seconds": max(time.perf_counter() - t0, like["seconds"] if like else 0.0)}


def _one_of_many(container: dict, seconds: float, barrier, results, launched: float) -> None:
    """A 1-thread measurement in its own process, timed once all of them are warm; and the
    seconds from its launch until it was ready to train, with what a run imports (MLflow too)."""
    from . import record  # noqa: F401  (a run's process imports it: its start-up counts)

    hardware.keep_freed_memory()
    b = train.build(OmegaConf.create(container))
    startup = time.time() - launched
    results.put((_speed(b, 1, seconds, ready=barrier.wait)["train"], startup))


def side_by_side(cfg, k: int, seconds: float) -> tuple[float, float]:
    """Mean training images/s of each of ``k`` 1-thread runs in ``k`` processes at once, and the
    longest start-up of those processes (launch to ready to train)."""
    ctx = forks.context()
    barrier, results = ctx.Barrier(k, timeout=120), ctx.Queue()
    container = OmegaConf.to_container(cfg, resolve=True)
    procs = [ctx.Process(target=_one_of_many, args=(container, seconds, barrier, results, time.time()), daemon=True)
             for _ in range(k)]
    for p in procs:
        p.start()
    got: list[tuple[float, float]] = []
    try:
        while len(got) < k:
            try:
                got.append(results.get(timeout=1))
            except queue.Empty:
                if not any(p.is_alive() for p in procs):
                    raise RuntimeError("the side-by-side speed measurement failed (its processes exited)") from None
        return statistics.mean(s for s, _ in got), max(t for _, t in got)
    finally:
        for p in procs:
            p.join(5)
            p.kill()


def waves(seeds: int, cores: int) -> list[tuple[int, int]]:
    """(runs at once, threads each) per wave of final runs: as many runs as cores, the cores
    shared out among them (workers x threads = cores)."""
    out = []
    while seeds > 0:
        k = min(seeds, cores)
        out.append((k, cores // k))
        seeds -= k
    return out


def epoch_seconds(speed: dict, threads: int, n_train: int, n_val: int, at_once: int = 1) -> float:
    """Seconds of one epoch (training, then the validation evaluation) with ``at_once`` runs sharing the machine."""
    s = speed["threads"][threads]
    return (n_train / s["train"] + n_val / s["eval"]) * (speed["slowdown"] if at_once > 1 else 1.0) + EPOCH_OVERHEAD


class Plan:
    """The budget's split: a safety margin, the search (seconds, trials and fidelities, one
    1-thread worker per core) and the final models (epochs, seeds, waves)."""

    def __init__(self, total: float, left: float, cores: list[int], speed: dict, cfg, attrs: dict):
        self.total, self.left, self.cores, self.speed, self.cfg = total, left, cores, speed, cfg
        self.seeds = cfg.budget.seeds
        self.waves = waves(self.seeds, len(cores))
        # The search's workers, as `workers` starts them: one per GPU, else one 1-thread worker per core.
        gpus = torch.cuda.device_count() if cfg.trainer.device != "cpu" else 0
        self.workers = gpus or len(cores)
        self.margin = float(attrs.get("budget.margin_s", min(0.1 * total, 20 + 0.02 * total)))
        usable = total - self.margin
        self.search_seconds = float(attrs.get("budget.search_seconds", cfg.budget.search_share * usable))
        epoch = epoch_seconds(speed, 1, speed["n_train"], speed["n_val"], at_once=self.workers)
        self.trial_seconds = cfg.trainer.epochs * epoch + TRIAL_OVERHEAD
        self.min_trial_seconds = epoch + TRIAL_OVERHEAD
        self.n_trials = max(1, math.floor(self.workers * self.search_seconds / (PRUNED_SHARE * self.trial_seconds)))
        self.final_epochs = plan_final(self, self.final_seconds(float(attrs.get("budget.phase.search", 0.0))))

    def final_seconds(self, searched: float) -> float:
        """The final phase's seconds as best.final will size it: what is left once the search's time
        still to come has passed, its workers' last runs have ended their records and processes,
        and the chosen configuration's speed has been measured again."""
        search_left = max(0.0, self.search_seconds - searched)
        tail = run_overhead(self.speed) + SEARCH_END if search_left > 0 else 0.0
        return self.left - self.margin - search_left - tail - self.speed["seconds"]

    def fits(self) -> bool:
        """Whether the budget holds the smallest plan: the search's workers started with one 1-epoch
        trial each, and one epoch of every final run."""
        started = self.speed["startup"] + WORKER_START
        return self.search_seconds >= started + self.min_trial_seconds and self.final_epochs >= 1

    def final_fixed_seconds(self) -> float:
        """Seconds of the final runs beside their epochs, wave after wave: each run's process start
        and record, and its test pass."""
        return sum(self.speed["startup"] + self.final_tail_seconds(t) for _, t in self.waves)

    def final_tail_seconds(self, threads: int) -> float:
        """Seconds of a final run with ``threads`` threads after its last epoch: its test pass (with
        the test-time shifts' views) and its record. Its training stops that long before the deadline."""
        views = 5 if self.cfg.trainer.test_shift else 1  # the speed is measured with the mirror's views only
        measured = self.speed["threads"]  # (1 thread always: a resumed session's last wave may have more)
        return views * self.speed["n_test"] / measured.get(threads, measured[1])["eval"] + RECORD_OVERHEAD

    def final_epoch_seconds(self) -> float:
        """Seconds per epoch of all the final runs together, wave after wave."""
        return sum(epoch_seconds(self.speed, threads, self.speed["n_all"], 0, at_once=k) for k, threads in self.waves)

    def text(self) -> str:
        s, f = self.speed, self.cfg.data.train_fraction
        speeds = ", ".join(f"{k} thread{'s' if k > 1 else ''}: {v['train']:,.0f} training / {v['eval']:,.0f} "
                           f"evaluation images/s" for k, v in s["threads"].items())
        if s["at_once"] > 1:
            speeds += f"; {s['at_once']} 1-thread runs at once: each {s['slowdown']:.2f}x slower"
        speeds += f"; a run's process starts in {s['startup']:.1f} s"
        final_seconds = self.final_epochs * self.final_epoch_seconds() + self.final_fixed_seconds()
        end = time.strftime("%H:%M", time.localtime(time.time() + self.left))
        widths = self.cfg.model.get("widths")
        model = self.cfg.model._target_.rsplit('.', 1)[-1] + (f" (widths {list(widths)})" if widths else "")
        return "\n".join([
            f"plan: {plural(len(self.cores), 'core')}; {model} {speeds}",
            f"  search {_m(self.search_seconds)}: {plural(self.workers, 'worker')}, about {plural(self.n_trials, 'trial')} "
            f"of 1 to {plural(self.cfg.trainer.epochs, 'epoch')} (Hyperband) on {f:.0%} of the training images "
            f"({s['n_train']:,}), judged on {s['n_val']:,} validation images",
            f"  final {_m(final_seconds)}: the best configuration on all {s['n_all']:,} images for "
            f"{plural(self.final_epochs, 'epoch')}, seeds 0..{self.seeds - 1} in waves of {[k for k, _ in self.waves]} "
            "runs; each tested once",
            f"  margin {_m(self.margin)}; expected end {end}"])


def plural(k: int, word: str) -> str:
    return f"{k} {word}{'' if k == 1 else 's'}"


def plan_final(plan: Plan, seconds: float) -> int:
    """The final models' epochs that fit in ``seconds`` (0: none fit)."""
    return max(0, math.floor((seconds - plan.final_fixed_seconds()) / plan.final_epoch_seconds()))


def run_overhead(speed: dict) -> float:
    """Seconds of a final run beside its epochs and test: its process's measured start-up and its record."""
    return speed["startup"] + RECORD_OVERHEAD


def minimum_budget(cfg, speed: dict, cores: list[int], spent: float) -> float:
    """The smallest budget (seconds, to 1%) whose plan fits (Plan.fits) on this machine, ``spent``
    seconds already gone."""
    def fits(total: float) -> bool:
        return Plan(total, total - spent, cores, speed, cfg, {}).fits()

    low, high = spent, max(2 * spent, 60.0)
    while not fits(high):
        low, high = high, 2 * high
    while high - low > 0.01 * high:
        mid = (low + high) / 2
        low, high = (low, mid) if fits(mid) else (mid, high)
    return high


def _m(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"
