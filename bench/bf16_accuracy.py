"""Does bf16 autocast cost accuracy? The same model, seed, data and epochs trained in
fp32 and in bf16 side by side in one process; final validation accuracy of each.

    python bench/bf16_accuracy.py                          # seed CNN, 3 epochs, seeds 0-2
    python bench/bf16_accuracy.py --seeds 0 data.train_fraction=0.5
    python bench/bf16_accuracy.py model=resnet trainer.epochs=5
    python bench/bf16_accuracy.py --quick                  # tiny: checks it runs
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--seeds", default="0,1,2", help="each seed trains both precisions; differences are per seed")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="fmnist-bf16-")
    os.chdir(work)
    os.environ["FMNIST_SWEEP_DIR"] = work
    from fmnist_sweep.config import compose
    from fmnist_sweep.record import run

    base = ["trainer.epochs=3", "trainer.test=false", "trainer.progress=false"]
    if args.quick:
        base += ["data.train_fraction=0.01", "data.val_fraction=0.05", "trainer.epochs=1"]
    seeds = [0] if args.quick else [int(x) for x in args.seeds.split(",")]
    acc, speed = {"fp32": [], "bf16": []}, {"fp32": [], "bf16": []}
    for seed in seeds:
        for precision in ("fp32", "bf16"):
            over = [*base, *args.overrides, f"seed={seed}", f"trainer.precision={precision}"]
            r = run(compose(over), over)
            if r.status != "FINISHED":
                raise SystemExit(f"{precision} run {r.status}: {r.message}")
            acc[precision].append(r.metrics["val/accuracy"])
            speed[precision].append(r.metrics["perf/images_per_s"])
            print(f"seed {seed} {precision}: val/accuracy {r.metrics['val/accuracy']:.4f}  val/loss "
                  f"{r.metrics['val/loss']:.4f}  {r.metrics['perf/images_per_s']:,.0f} img/s  ({' '.join(over)})",
                  flush=True)
    diffs = [100 * (b - f) for b, f in zip(acc["bf16"], acc["fp32"])]
    spread = 100 * (statistics.stdev(acc["fp32"]) if len(seeds) > 1 else 0.0)
    print(f"fp32: val/accuracy mean {statistics.mean(acc['fp32']):.4f}; bf16: {statistics.mean(acc['bf16']):.4f}; "
          f"seed-to-seed std of fp32 {spread:.2f} points")
    print(f"bf16 - fp32: {statistics.mean(diffs):+.2f} points of val/accuracy on average over {len(seeds)} seed(s) "
          f"(per seed: {', '.join(f'{d:+.2f}' for d in diffs)}; target: within 0.3), "
          f"{statistics.mean(speed['bf16']) / statistics.mean(speed['fp32']):.2f}x the images/s")


if __name__ == "__main__":
    main()
