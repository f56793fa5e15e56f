"""Does bf16 autocast cost accuracy? The same model, seed, data and epochs trained in
fp32 and in bf16 side by side in one process; final validation accuracy of each.

    python bench/bf16_accuracy.py                          # seed CNN, 3 epochs, all the data (~6 min)
    python bench/bf16_accuracy.py model=resnet trainer.epochs=5
    python bench/bf16_accuracy.py --quick                  # tiny: checks it runs
"""

from __future__ import annotations

import argparse
import os
import tempfile


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="fmnist-bf16-")
    os.chdir(work)
    os.environ["FMNIST_SWEEP_DIR"] = work
    from fmnist_sweep.config import compose
    from fmnist_sweep.train import run

    base = ["trainer.epochs=3", "trainer.test=false", "trainer.progress=false"]
    if args.quick:
        base += ["data.train_fraction=0.01", "data.val_fraction=0.05", "trainer.epochs=1"]
    results = {}
    for precision in ("fp32", "bf16"):
        over = [*base, *args.overrides, f"trainer.precision={precision}"]
        r = run(compose(over), over)
        if r.status != "FINISHED":
            raise SystemExit(f"{precision} run {r.status}: {r.message}")
        results[precision] = r
        print(f"{precision}: val/accuracy {r.metrics['val/accuracy']:.4f}  val/loss {r.metrics['val/loss']:.4f}  "
              f"{r.metrics['perf/images_per_s']:,.0f} img/s  ({' '.join(over)})", flush=True)
    diff = 100 * (results["bf16"].metrics["val/accuracy"] - results["fp32"].metrics["val/accuracy"])
    speed = results["bf16"].metrics["perf/images_per_s"] / results["fp32"].metrics["perf/images_per_s"]
    print(f"bf16 - fp32: {diff:+.2f} points of val/accuracy (target: within 0.3), {speed:.2f}x the images/s")


if __name__ == "__main__":
    main()
