"""What logging a run's MLflow Model costs, per model family: the export of torch's own
layers (torch.export) and MLflow's save and upload, timed through fmnist_sweep.served.log
into a fresh local store, beside the run's weights file alone (torch.save of the
state_dict, what every finished run keeps). The first export in a process also pays
torch.export's and mlflow.pytorch's imports: printed apart.

    python bench/model_logging.py                 # every family, default configs, 3 repeats
    python bench/model_logging.py --quick         # cnn only, 1 repeat: checks it runs
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import tempfile
import time

import numpy as np

FAMILIES = ("cnn", "resnet", "encoder_classifier", "autoencoder", "rnn", "bilstm")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    families, repeats = (("cnn",), 1) if args.quick else (FAMILIES, args.repeats)
    os.chdir(tempfile.mkdtemp(prefix="fmnist-models-"))

    import torch
    from hydra.utils import instantiate

    from fmnist_sweep import served
    from fmnist_sweep.config import compose
    from fmnist_sweep.tracking import Tracker

    torch.set_num_threads(1)
    tracker = Tracker(f"sqlite:///{os.getcwd()}/mlruns.db", "bench-models", "artifacts")
    example = np.random.default_rng(0).integers(0, 256, (2, 28, 28), dtype=np.uint8)
    print(f"one thread; median of {repeats} after the first export in this process")
    print(f"{'family':<20}{'parameters':>12}{'weights file':>14}{'MLflow Model':>14}")
    first = None
    for family in families:
        model = instantiate(compose([f"model={family}"]).model)
        times, saves = [], []
        for i in range(repeats + (first is None)):
            run_id = tracker.start(f"{family} {i}", {}, {})
            t = time.perf_counter()
            served.log(tracker, run_id, model, example, step=0)
            times.append(time.perf_counter() - t)
            t = time.perf_counter()
            torch.save(model.state_dict(), io.BytesIO())
            saves.append(time.perf_counter() - t)
            tracker.end(run_id, "FINISHED")
        if first is None:
            first = times.pop(0)
        n = sum(p.numel() for p in model.parameters())
        print(f"{family:<20}{n:>12,}{statistics.median(saves) * 1000:>11.0f} ms"
              f"{statistics.median(times) * 1000:>11.0f} ms", flush=True)
    print(f"first export in a process ({families[0]}, imports included): {first * 1000:.0f} ms")


if __name__ == "__main__":
    main()
