"""What pruning buys: best validation accuracy vs training epochs spent, for TPE + our
median pruner, TPE without pruning, and random search, on one fixed small experiment.

The experiment: the PyTorch study's encoder classifier (conv encoder + linear head) and
the factors that study varied — optimizer, learning rate (log, 1e-4 to 3e-2), dropout,
latent size, batch size — 10 epochs per trial on 5,400 training images (10% of what the
6,000-image validation split leaves). Every arm runs that search space with the same
sampler seed, on the same data slice, through the real Study. Epochs spent = every
epoch trained, pruned trials included; the best value counts complete trials only.
Figures of merit: (1) epochs until a pruned search first comes within 0.2 points of
the unpruned TPE arm's best, against the epochs that arm needed to first reach it;
(2) for the replays, the epochs of the whole search, same trials, with the best kept
within 0.2 points (a search is judged when it ends: nobody knows the best is the best
until then). (1) is 0% whenever the unpruned best came from the first trials, before
the pruner may act (its n_startup_trials).

Two live arms with different pruning also sample different trials (TPE learns from
what was pruned), so on a small experiment their difference is mostly which lucky
configuration each happened to draw. The replay separates the pruner from that luck:
each pruner (built by fmnist_sweep.sweep.make_pruner, as a sweep would build it)
watches the unpruned TPE arm's recorded learning curves epoch by epoch, in trial
order, in an in-memory Optuna study, and stops what it would have stopped; the same
trials, so the epochs it saves are pruning's alone.

    python bench/sweep_efficiency.py                  # 16 trials (32 pruned) per arm, ~50 min on 1 core
    python bench/sweep_efficiency.py --seeds 0,1,2    # more sampler seeds (medians)
    python bench/sweep_efficiency.py --plot docs/sweep_efficiency_F.png --workdir DIR  # keep the studies
    python bench/sweep_efficiency.py --quick          # tiny: checks it runs
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import textwrap
from pathlib import Path

# arm: (sampler, pruner, trial budget as a multiple of --trials). Pruning exists to buy more
# trials with the same epochs, so the pruned arm may run twice the trials; what is compared
# is the epochs each arm spends to reach a given best.
ARMS = {
    "tpe + median pruner": ("tpe", "{name: median, n_startup_trials: 3, n_warmup_steps: 1}", 2),
    "tpe, no pruning": ("tpe", "{name: none}", 1),
    "random, no pruning": ("random", "{name: none}", 1),
}
SPACE = """
  optimizer: choice(adam, rmsprop, sgd)
  optimizer.lr: tag(log, interval(1e-4, 3e-2))
  model.dropout: interval(0.0, 0.5)
  model.latent_dim: choice(16, 32, 64, 128)
  trainer.batch_size: choice(32, 64, 128)
"""
TOLERANCE = 0.002
# Pruners replayed on the unpruned TPE arm's curves (sweep-file pruner specs).
REPLAYED = {
    "median (quickstart's)": {"name": "median", "n_startup_trials": 3, "n_warmup_steps": 1},
    "percentile 25": {"name": "percentile", "n_startup_trials": 3, "n_warmup_steps": 1},
    "successive halving": {"name": "successive_halving"},
    "hyperband": {"name": "hyperband"},
}


def run_arm(name, sampler, pruner, seed, trials, overrides, work: Path):
    from optuna.trial import TrialState

    from fmnist_sweep.config import compose
    from fmnist_sweep.study import Study

    sampler_spec = f"{{name: {sampler}, seed: {seed}" + (", n_startup_trials: 4}" if sampler == "tpe" else "}")
    path = work / f"{sampler}-{'prune' if 'median' in pruner else 'all'}-{seed}.yaml"
    path.write_text(textwrap.dedent(f"""\
        objective: val/accuracy
        n_trials: {trials}
        sampler: {sampler_spec}
        pruner: {pruner}
        params:""") + SPACE)
    over = [f"sweep={path}", f"study.name={path.stem}", "model=encoder_classifier", "optimizer=adam", "trainer.test=false",
            "trainer.progress=false", f"seed={seed}", *overrides]
    cfg = compose(over)
    study = Study(cfg, over)
    study.optimize()
    trials = [t for t in sorted(study.optuna.get_trials(deepcopy=False), key=lambda t: t.number)
              if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    curve, spent, best = [], 0, None
    for t in trials:
        spent += len(t.intermediate_values)
        if t.state == TrialState.COMPLETE and (best is None or t.value > best):
            best = t.value
        curve.append((spent, best))
    return curve, trials, study.sweep, cfg.trainer.epochs


def replay(trials, sweep, epochs, pruner_spec):
    """The best-so-far curve a pruner would have produced on these recorded trials: each
    trial's per-epoch values reported in order to a fresh in-memory study with that
    pruner; a pruned trial costs the epochs it ran and yields no result."""
    import dataclasses

    import optuna

    from fmnist_sweep.sweep import make_pruner

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    pruner = make_pruner(dataclasses.replace(sweep, pruner=pruner_spec), epochs)
    # a fixed name: Hyperband assigns trials to brackets by a hash of study name and trial number
    study = optuna.create_study(study_name=f"replay-{pruner_spec['name']}", direction="maximize", pruner=pruner)
    curve, spent, best, pruned = [], 0, None, 0
    for t in trials:
        trial = study.ask()
        steps = sorted(t.intermediate_values)
        for step in steps:
            trial.report(t.intermediate_values[step], step)
            spent += 1
            if step != steps[-1] and trial.should_prune():  # as the trainer: the last epoch is kept
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                pruned += 1
                break
        else:
            study.tell(trial, t.value)
            best = t.value if best is None else max(best, t.value)
        curve.append((spent, best))
    return curve, pruned


def epochs_to_reach(curve, target):
    return next((spent for spent, best in curve if best is not None and best >= target), None)


def _args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--plot", help="write best-so-far vs epochs to this PNG")
    ap.add_argument("--workdir", help="keep the studies here (default: a fresh temporary folder); a finished "
                    "run's folder given again re-reads its studies and trains nothing")
    ap.add_argument("--quick", action="store_true")
    return ap.parse_args()


def main():
    args = _args()
    data = ["data.train_fraction=0.1", "data.val_fraction=0.1", "trainer.epochs=10"]
    if args.quick:
        args.trials, data = 4, ["data.train_fraction=0.01", "data.val_fraction=0.02", "trainer.epochs=3"]
    plot = Path(args.plot).resolve() if args.plot else None
    work = Path(args.workdir).resolve() if args.workdir else Path(tempfile.mkdtemp(prefix="fmnist-sweepeff-"))
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)
    os.environ["FMNIST_SWEEP_DIR"] = str(work)
    overrides = [*data, *args.overrides]
    print(f"experiment: encoder classifier, the PyTorch study's factors, {' '.join(overrides)}; trials: "
          + ", ".join(f"{arm} {args.trials * times}" for arm, (_, _, times) in ARMS.items()))
    curves = {arm: [] for arm in ARMS}
    replayed = {name: [] for name in REPLAYED}
    saved = {"live: tpe + median pruner": [], **{f"replay: {name}": [] for name in REPLAYED}}
    whole = {f"replay: {name}": [] for name in REPLAYED}
    for seed in [int(s) for s in args.seeds.split(",")]:
        recorded = None
        for arm, (sampler, pruner, times) in ARMS.items():
            curve, trials, sweep, epochs = run_arm(arm, sampler, pruner, seed, args.trials * times, overrides, work)
            curves[arm].append(curve)
            spent, best = curve[-1]
            print(f"seed {seed}  {arm:<22} best val/accuracy {best:.4f}  after {spent} epochs in all", flush=True)
            if arm == "tpe, no pruning":
                recorded = (trials, sweep, epochs)
        _compare(seed, curves, recorded, replayed, saved, whole)
    _summary(saved, whole)
    if plot:
        _plot(plot, curves, replayed)


def _compare(seed, curves, recorded, replayed, saved, whole) -> None:
    """One seed's rows: epochs the live pruned arm and each replayed pruner took to come within
    TOLERANCE of the no-pruning best, and the replays' whole-search savings."""
    ref = curves["tpe, no pruning"][-1]
    (ref_total, ref_best), ref_epochs = ref[-1], epochs_to_reach(ref, ref[-1][1])
    print(f"seed {seed}  no-pruning TPE: best {ref_best:.4f}, first reached after {ref_epochs} of its "
          f"{ref_total} epochs. With pruning, epochs to first come within {100 * TOLERANCE:.1f} pt of it; "
          f"for the replays also the whole search (same trials):", flush=True)
    candidates = [("live: tpe + median pruner", curves["tpe + median pruner"][-1], "")]
    for name, spec in REPLAYED.items():
        curve, pruned = replay(*recorded, spec)
        replayed[name].append(curve)
        candidates.append((f"replay: {name}", curve, f"; {pruned} of {len(curve)} trials pruned"))
    for label, curve, extra in candidates:
        got = epochs_to_reach(curve, ref_best - TOLERANCE)
        frac = None if got is None else 1 - got / ref_epochs
        saved[label].append(frac)
        line = (f"seed {seed}    {label:<32}" + (f"first within: {got:>4} epochs ({100 * frac:3.0f}% saved)"
                                                 if got is not None else "first within: never"))
        if label.startswith("replay"):
            total, best = curve[-1]
            kept = best is not None and best >= ref_best - TOLERANCE
            whole[label].append(1 - total / ref_total if kept else None)
            line += (f"; whole search: {total:>4} of {ref_total} epochs ({100 * (1 - total / ref_total):3.0f}% "
                     f"saved), best {best:.4f} " + ("kept" if kept else "LOST"))
        print(line + extra, flush=True)


def _summary(saved, whole) -> None:
    n = len(saved["live: tpe + median pruner"])
    print(f"epochs saved by pruning, median over {n} seed(s) ('never' and a lost best count as 0%): to first come "
          f"within {100 * TOLERANCE:.1f} pt of the no-pruning best | over the whole search with its best kept")
    for label, fracs in saved.items():
        line = (f"  {label:<36}{100 * statistics.median([f or 0.0 for f in fracs]):4.0f}%"
                f"  (reached on {sum(f is not None for f in fracs)} of {n})")
        if label in whole:
            w = whole[label]
            line += (f" | {100 * statistics.median([f or 0.0 for f in w]):4.0f}%"
                     f"  (best kept on {sum(f is not None for f in w)} of {n})")
        print(line)


def _plot(plot: Path, curves, replayed) -> None:
    from fmnist_sweep.artifacts import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9.5, 4.2))
    series = [(arm, cs, "-") for arm, cs in curves.items()]
    series += [(f"replay: {name}", cs, "--") for name, cs in replayed.items()]
    for i, (label, cs, style) in enumerate(series):
        for j, c in enumerate(cs):
            pts = [(s, b) for s, b in c if b is not None]
            # the live pruned arm on top and thicker: the replays often retrace it step for step
            ax.step([p[0] for p in pts], [p[1] for p in pts], where="post", color=f"C{i}", alpha=0.9,
                    linestyle=style, label=label if j == 0 else None,
                    linewidth=2.4 if i == 0 else 1.3, zorder=3 if i == 0 else 2)
    unpruned = curves.get("tpe, no pruning", [])
    if len(unpruned) == 1:  # one seed: the line "first within" is measured against
        best = max(b for _, b in unpruned[0] if b is not None)
        ax.axhline(best - TOLERANCE, color="0.4", linewidth=0.8, linestyle=":",
                   label="0.2 pt below the no-pruning best")
    ax.set_xlabel("training epochs spent (all trials, pruned included)")
    ax.set_ylabel("best val/accuracy so far")
    ax.set_title("search efficiency (dashed: pruners replayed on the no-pruning TPE trials)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the curves, not over them
    fig.tight_layout()
    plot.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(plot, dpi=100)
    print(f"plot: {plot}")


if __name__ == "__main__":
    main()
