"""What pruning buys: best validation accuracy vs training epochs spent, for TPE + our
median pruner, TPE without pruning, and random search, on one fixed small experiment.

Every arm runs the same search space (the quickstart sweep's: optimizer, learning rate,
activation, batch size of the seed CNN) with the same sampler seed, on the same data
slice, through the real Study. Epochs spent = every epoch trained, pruned trials
included; the best value counts complete trials only. The figure of merit: epochs
the pruned arm needs to come within 0.2 points of the unpruned arm's best, against the
epochs the unpruned arm needed to reach that best.

    python bench/sweep_efficiency.py                  # 16 trials (32 pruned) per arm, ~25 min on 1 core
    python bench/sweep_efficiency.py --seeds 0,1      # more sampler seeds (medians)
    python bench/sweep_efficiency.py --plot docs/sweep_efficiency.png
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
  optimizer: choice(adam, rmsprop)
  optimizer.lr: tag(log, interval(3e-4, 3e-2))
  model.activation: choice(tanh, relu)
  trainer.batch_size: choice(64, 100, 128)
"""
TOLERANCE = 0.002


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
    over = [f"sweep={path}", f"study.name={path.stem}", "model=cnn", "optimizer=rmsprop", "trainer.test=false",
            "trainer.progress=false", f"seed={seed}", *overrides]
    study = Study(compose(over), over)
    study.optimize()
    curve, spent, best = [], 0, None
    for t in sorted(study.optuna.get_trials(deepcopy=False), key=lambda t: t.number):
        if t.state not in (TrialState.COMPLETE, TrialState.PRUNED):
            continue
        spent += len(t.intermediate_values)
        if t.state == TrialState.COMPLETE and (best is None or t.value > best):
            best = t.value
        curve.append((spent, best))
    return curve


def epochs_to_reach(curve, target):
    return next((spent for spent, best in curve if best is not None and best >= target), None)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--plot", help="write best-so-far vs epochs to this PNG")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    data = ["data.train_fraction=0.05", "data.val_fraction=0.05", "trainer.epochs=6"]
    if args.quick:
        args.trials, data = 4, ["data.train_fraction=0.01", "data.val_fraction=0.02", "trainer.epochs=3"]
    plot = Path(args.plot).resolve() if args.plot else None
    work = Path(tempfile.mkdtemp(prefix="fmnist-sweepeff-"))
    os.chdir(work)
    os.environ["FMNIST_SWEEP_DIR"] = str(work)
    overrides = [*data, *args.overrides]
    print(f"experiment: seed CNN, quickstart's search space, {' '.join(overrides)}; trials: "
          + ", ".join(f"{arm} {args.trials * times}" for arm, (_, _, times) in ARMS.items()))
    curves = {arm: [] for arm in ARMS}
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for arm, (sampler, pruner, times) in ARMS.items():
            curves[arm].append(run_arm(arm, sampler, pruner, seed, args.trials * times, overrides, work))
            spent, best = curves[arm][-1][-1]
            print(f"seed {seed}  {arm:<22} best val/accuracy {best:.4f}  after {spent} epochs in all", flush=True)
        ref = curves["tpe, no pruning"][-1]
        ref_best = ref[-1][1]
        ref_epochs = epochs_to_reach(ref, ref_best)
        got = epochs_to_reach(curves["tpe + median pruner"][-1], ref_best - TOLERANCE)
        saved = None if got is None else 1 - got / ref_epochs
        rows.append(saved)
        print(f"seed {seed}  no-pruning best {ref_best:.4f} reached after {ref_epochs} epochs; pruned TPE within "
              f"{100 * TOLERANCE:.1f} pt after " + (f"{got} epochs: {100 * saved:.0f}% of the epochs saved"
                                                     if got is not None else "— (not reached)"), flush=True)
    reached = [s for s in rows if s is not None]
    if reached:
        print(f"epochs saved by pruning (median over {len(rows)} seed(s), {len(reached)} reached): "
              f"{100 * statistics.median(reached):.0f}%")
    else:
        print("epochs saved by pruning: the pruned arm never came within 0.2 points of the unpruned best")
    if plot:
        from fmnist_sweep.artifacts import _pyplot

        plt = _pyplot()
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for i, (arm, cs) in enumerate(curves.items()):
            for j, c in enumerate(cs):
                pts = [(s, b) for s, b in c if b is not None]
                ax.step([p[0] for p in pts], [p[1] for p in pts], where="post", color=f"C{i}", alpha=0.9,
                        label=arm if j == 0 else None)
        ax.set_xlabel("training epochs spent (all trials, pruned included)")
        ax.set_ylabel("best val/accuracy so far")
        ax.set_title("search efficiency: " + " ".join(overrides))
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        plot.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(plot, dpi=100)
        print(f"plot: {plot}")


if __name__ == "__main__":
    main()
