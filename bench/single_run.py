"""One training run's wall time by phase: the command as users run it against a tutorial script.

    python bench/single_run.py                 # the Keras CNN, 1 epoch of 18,000 images, validation and test
    python bench/single_run.py --repeats 3     # medians of 3 of each, alternated
    python bench/single_run.py --quick         # tiny random data: checks it runs

Ours: `python -m fmnist_sweep trainer.epochs=1 data.train_fraction=F` in a fresh work dir (its
MLflow store made, the decoded data cached by a first run). Its phases come from its MLflow run:
start-up (the command's start to the run's start, less the data and model build), data + model
(perf/build_seconds), the epoch with its validation (perf/epoch_seconds), the test
(perf/test_seconds), artifacts (perf/artifacts_seconds), the MLflow Model (perf/model_seconds),
the rest of the record (the run's span less those), and exit (the run's end to the process gone).
Baseline: TUTORIAL, the script a PyTorch tutorial reader writes (numpy IDX reading, the same CNN
from torch layers, RMSprop, the same images, one epoch, validation and test, a saved state_dict),
timing its own phases. Both at --threads threads."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from orchestration import tiny_idx  # noqa: E402

REAL = Path("/usr/share/datasets/fashion-mnist")

TUTORIAL = r'''
import gzip, sys, time
T0 = time.time()
import numpy as np, torch
from torch import nn

def phase(name, since):
    print(f"PHASE {name} {time.time() - since:.3f}", flush=True)
    return time.time()

t = phase("start-up", T0)
root, n_train, n_val, n_test, threads = sys.argv[1], *map(int, sys.argv[2:6])
torch.set_num_threads(threads)

def read(name, offset, shape):
    with gzip.open(f"{root}/{name}") as f:
        return torch.from_numpy(np.frombuffer(f.read(), np.uint8, offset=offset).copy()).reshape(shape)

x = read("train-images-idx3-ubyte.gz", 16, (-1, 1, 28, 28)).float() / 255
y = read("train-labels-idx1-ubyte.gz", 8, (-1,)).long()
xt = read("t10k-images-idx3-ubyte.gz", 16, (-1, 1, 28, 28)).float()[:n_test] / 255
yt = read("t10k-labels-idx1-ubyte.gz", 8, (-1,)).long()[:n_test]
xtr, ytr, xv, yv = x[:n_train], y[:n_train], x[-n_val:], y[-n_val:]
layers, c = [], 1
for w, p in ((32, 0.2), (64, 0.3), (128, 0.4)):
    layers += [nn.Conv2d(c, w, 3, padding=1), nn.Tanh(), nn.BatchNorm2d(w), nn.Conv2d(w, w, 3, padding=1),
               nn.Tanh(), nn.BatchNorm2d(w), nn.MaxPool2d(2), nn.Dropout(p)]
    c = w
model = nn.Sequential(*layers, nn.Flatten(), nn.Linear(128 * 3 * 3, 16), nn.ReLU(), nn.BatchNorm1d(16),
                      nn.Dropout(0.5), nn.Linear(16, 10))
opt = torch.optim.RMSprop(model.parameters(), lr=1e-3, alpha=0.9, eps=1e-7)
t = phase("data + model", t)

def accuracy(xs, ys):
    model.eval()
    with torch.no_grad():
        return sum((model(xs[i:i + 1000]).argmax(1) == ys[i:i + 1000]).sum().item()
                   for i in range(0, len(xs), 1000)) / len(xs)

model.train()
perm = torch.randperm(n_train)
for i in range(0, n_train, 100):
    idx = perm[i:i + 100]
    opt.zero_grad()
    nn.functional.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
    opt.step()
print(f"val accuracy {accuracy(xv, yv):.4f}")
t = phase("epoch (with validation)", t)
print(f"test accuracy {accuracy(xt, yt):.4f}")
t = phase("test", t)
torch.save(model.state_dict(), "model.pt")
phase("saved state_dict", t)
'''

OURS = ("start-up", "data + model", "epoch (with validation)", "test", "artifacts", "MLflow Model", "rest of the record",
        "exit")


def timed(cmd: list[str], cwd: Path) -> tuple[float, float, float, str]:
    """The process's start and end (Unix times), its last output line's time, and its output."""
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    out, last = [], t0
    for line in proc.stdout:
        out.append(line)
        last = time.time()
    if proc.wait() != 0:
        sys.exit(f"{cmd[:4]} failed:\n{''.join(out)[-2000:]}")
    return t0, time.time(), last, "".join(out)


def ours(work: Path, overrides: list[str]) -> dict:
    """One run of the command in ``work``; its phases in seconds, from its MLflow run."""
    from mlflow.tracking import MlflowClient

    t0, t1, _, _ = timed([sys.executable, "-m", "fmnist_sweep", *overrides], work)
    client = MlflowClient(f"sqlite:///{work / 'mlruns.db'}")
    run = client.search_runs([client.get_experiment_by_name("fmnist-sweep").experiment_id],
                             order_by=["attributes.start_time DESC"], max_results=1)[0]
    m, start, end = run.data.metrics, run.info.start_time / 1000, run.info.end_time / 1000
    epochs = sum(x.value for x in client.get_metric_history(run.info.run_id, "perf/epoch_seconds"))
    inside = {"epoch (with validation)": epochs, "test": m["perf/test_seconds"],
              "artifacts": m["perf/artifacts_seconds"], "MLflow Model": m.get("perf/model_seconds", 0.0)}
    phases = {"start-up": start - t0 - m["perf/build_seconds"], "data + model": m["perf/build_seconds"], **inside,
              "rest of the record": end - start - sum(inside.values()), "exit": t1 - end}
    # The splits' sizes, from the run's dataset inputs (their profiles count the rows)
    sizes = {i.tags[0].value: json.loads(i.dataset.profile)["num_rows"] for i in run.inputs.dataset_inputs}
    n = {"train": sizes["training"], "val": sizes.get("validation", 0), "test": sizes["test"]}
    return {"phases": phases, "whole": t1 - t0, "epochs": epochs, "n": n}


def tutorial(work: Path, args, n: dict) -> dict:
    """One run of the tutorial script on the same numbers of images; its phases in seconds, as it timed them."""
    script = work / "tutorial.py"
    script.write_text(TUTORIAL)
    t0, t1, last, out = timed([sys.executable, str(script), str(args.data), str(n["train"]), str(n["val"]),
                               str(n["test"]), str(args.threads)], work)
    phases = {line.split(" ", 1)[1].rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
              for line in out.splitlines() if line.startswith("PHASE ")}
    phases["exit"] = t1 - last
    phases["start-up"] += (t1 - t0) - sum(phases.values())  # with the interpreter's own start, before the script
    return {"phases": phases, "whole": t1 - t0, "epochs": phases["epoch (with validation)"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--fraction", type=float, default=1 / 3, help="data.train_fraction (1/3: 18,000 images)")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fmnist-single-"))
    args.data = REAL if REAL.is_dir() and not args.quick else work / "data"
    if args.quick:
        tiny_idx(args.data, 300, 100)
        args.fraction = 1.0
    over = [f"data.root={args.data}", "data.verify=false", "data.download=false", "trainer.epochs=1",
            f"data.train_fraction={args.fraction:.4f}", f"trainer.threads={args.threads}"]
    os.environ.update({"FMNIST_SWEEP_DIR": str(work), "FMNIST_CACHE_DIR": str(work / "cache")})
    first = ours(work, over)  # fills the decoded-data cache and makes the MLflow store
    n = first["n"]
    runs = {"ours": [], "tutorial": []}
    for _ in range(args.repeats):
        runs["ours"].append(first if args.quick else ours(work, over))  # --quick: its shape, from one run
        runs["tutorial"].append(tutorial(work, args, n))
    _table(runs, n, args, first)


def _median(rs: list[dict], key: str) -> float:
    return statistics.median(r["phases"].get(key, 0.0) for r in rs)


def _table(runs: dict, n: dict, args, first: dict) -> None:
    print(f"one run, the Keras CNN, 1 epoch of {n['train']:,} images, validation on {n['val']:,}, test on "
          f"{n['test']:,}; {args.threads} thread(s); median of {args.repeats}; seconds")
    print(f"{'phase':<26}{'ours':>9}{'tutorial':>10}")
    keys = list(OURS) + [k for k in runs["tutorial"][0]["phases"] if k not in OURS]
    for k in keys:
        print(f"{k:<26}{_median(runs['ours'], k):9.2f}{_median(runs['tutorial'], k):10.2f}")
    whole = {k: statistics.median(r["whole"] for r in rs) for k, rs in runs.items()}
    epoch = {k: statistics.median(r["epochs"] for r in rs) for k, rs in runs.items()}
    print(f"{'whole process':<26}{whole['ours']:9.2f}{whole['tutorial']:10.2f}")
    for k in ("ours", "tutorial"):
        print(f"{k}: outside the epoch {whole[k] - epoch[k]:.2f} s, {(whole[k] - epoch[k]) / whole[k]:.0%} of the "
              "process's wall time")
    in_process, process = epoch["tutorial"] / epoch["ours"], whole["tutorial"] / whole["ours"]
    print(f"speed-up over the tutorial: the epoch {in_process:.2f}x, the whole process {process:.2f}x "
          f"({process / in_process:.2f} of the epoch's)")
    print(f"(the first run, which decoded the data and made the MLflow store: {first['whole']:.2f} s)")


if __name__ == "__main__":
    main()
