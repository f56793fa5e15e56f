"""Per-trial cost of the study machinery (Optuna storage + MLflow + the standard artifacts)
against a no-op Optuna objective, for each storage and tracking store, side by side.

Each trial is a real fmnist_sweep trial (compose, suggest, MLflow child run with the
config as params and the splits as dataset inputs, 20 epochs of metrics logged one batch
per epoch with an Optuna report each, final evaluation, artifacts rendered and stored,
the MLflow Model exported and logged when the trial is the best so far, tell) whose
training and evaluation are replaced by instant stand-ins: what is left is the
orchestration. Per trial: the median of the rest plus the mean of the model logging (it
happens on some trials only), with its split and as a share of a 30-second trial.

    python bench/orchestration.py                           # sqlite, journal (+ postgres) x local (+ server)
    python bench/orchestration.py --pg-url postgresql+psycopg2://postgres@127.0.0.1:5432/postgres
    python bench/orchestration.py --quick                   # 3 trials of 2 epochs on 100 images, sqlite + local: checks it runs
    python bench/orchestration.py --log-models all          # every trial logs its MLflow Model
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pgdb import fresh_database  # noqa: E402
from trial_breakdown import SPENT, instrument  # noqa: E402

TRIAL_SECONDS = 30.0  # the reference trial


def tiny_idx(folder: Path, n_train=600, n_test=200) -> None:
    """Random images in the real IDX format (pixel values do not matter here)."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        (folder / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(
            (0x803).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in images.shape) + images.tobytes()))
        (folder / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(
            (0x801).to_bytes(4, "big") + n.to_bytes(4, "big") + labels.tobytes()))


def stand_ins():
    """Instant train_epoch / evaluate with the real return shapes."""
    from fmnist_sweep import train

    rng = np.random.default_rng(0)

    def train_epoch(*a, **k):
        return 0.5

    def evaluate(model, split, batch_size, autocast, channels_last, keep_outputs=False, flip=False, shift=0):
        out = {"loss": 0.5 + rng.random() * 0.01, "accuracy": 0.8 + rng.random() * 0.01}
        if keep_outputs:
            out["outputs"] = rng.integers(0, 10, size=len(split)).astype(np.int64)
        return out

    train.train_epoch, train.evaluate = train_epoch, evaluate


def start_mlflow_server(work: Path) -> tuple[subprocess.Popen, str]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(work / "mlflow-server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{work / 'server.db'}",
         "--artifacts-destination", str(work / "server-artifacts"), "--serve-artifacts",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, stdout=log, stderr=subprocess.STDOUT)
    uri = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            urllib.request.urlopen(uri + "/health", timeout=2)
            return proc, uri
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.5)
    proc.kill()
    sys.exit(f"mlflow server did not start (log: {log.name})")


def noop_ms(n: int) -> float:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study()
    t = time.perf_counter()
    study.optimize(lambda tr: tr.suggest_float("x", 0, 1), n_trials=n)
    return (time.perf_counter() - t) / n * 1000


def measure(label: str, overrides: list[str], trials: int, epochs: int) -> dict:
    from fmnist_sweep.config import compose, resource_dir
    from fmnist_sweep.study import Study

    # quickstart's search space without its pruner: every trial logs all its epochs and its artifacts
    sweep = Path(f"bench-{label.replace(' ', '').replace('+', '-')}.yaml").resolve()
    text = (resource_dir("sweeps") / "quickstart.yaml").read_text()
    sweep.write_text(re.sub(r"(?m)^pruner:.*$", "pruner: {name: none}", text))
    cfg_over = ["+experiment=quickstart", f"sweep={sweep}", f"trainer.epochs={epochs}", f"study.n_trials={trials + 1}",
                f"study.name=bench-{label.replace(' ', '-').replace('+', '')}", "trainer.progress=false", *overrides]
    study = Study(compose(cfg_over), cfg_over)
    stamps = []
    after = study._after_trial

    def stamp(st, tr):
        after(st, tr)
        stamps.append((time.perf_counter(), dict(SPENT)))

    study._after_trial = stamp
    SPENT.clear()
    stamps.append((time.perf_counter(), {}))
    log = io.StringIO()  # the study's own lines (one per trial) would break up the table
    try:
        with contextlib.redirect_stdout(log):
            study.optimize()
    except BaseException:
        print(log.getvalue(), end="")
        raise
    failed = [t for t in study.optuna.trials if t.state.name != "COMPLETE"]
    if failed:  # a stand-in out of step with the code it replaces: the trials measured nothing
        sys.exit(f"{label}: trial {failed[0].number} {failed[0].state.name}: {failed[0].user_attrs.get('failure')}")
    # Per trial: the interval between consecutive trial ends; the first trial is warm-up.
    per = []
    for (t0, s0), (t1, s1) in zip(stamps[1:], stamps[2:]):
        per.append({"total": t1 - t0, **{k: s1.get(k, 0) - s0.get(k, 0) for k in s1}})
    # Model logging happens on some trials only: its mean, added to the median of the rest.
    model = statistics.mean(p.get("model", 0) for p in per)
    med = {k: statistics.median(p.get(k, 0) for p in per) for k in per[0] if k != "model"}
    med["total"] = statistics.median(p["total"] - p.get("model", 0) for p in per) + model
    med["model"] = model
    med["logged"] = sum(p.get("model", 0) > 0 for p in per)
    return med


PROBE = """
import os, sys, time
import fmnist_sweep.train as T
def first_step(*a, **k):
    print(f"FIRST_STEP {time.time():.6f}", flush=True)
    os._exit(0)
T.train_epoch = first_step
from fmnist_sweep.cli import main
main(sys.argv[1:])
"""


def startup_seconds(overrides: list[str], repeats: int = 3) -> float:
    """Command -> first training step of a single run (data already decoded and cached),
    median of fresh processes: interpreter start, imports, compose, MLflow run, data, model."""
    times = []
    for _ in range(repeats + 1):  # the first one fills the decoded-data cache (repeats=0: only that one)
        t = time.time()
        proc = subprocess.run([sys.executable, "-c", PROBE, *overrides], capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("FIRST_STEP")), None)
        if line is None:
            sys.exit(f"start-up probe failed:\n{proc.stdout[-1500:]}{proc.stderr[-1500:]}")
        times.append(float(line.split()[1]) - t)
    return statistics.median(times[1:] or times)


PLAIN_EXIT = "import sys; from fmnist_sweep.cli import main; raise SystemExit(main(sys.argv[1:]))"


def exit_seconds(cmd: list[str]) -> float:
    """Last output line -> process gone (output unbuffered, so a line arrives when printed)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    last, out = time.time(), []
    for line in proc.stdout:
        last = time.time()
        out.append(line)
    if proc.wait() != 0:
        sys.exit(f"exit probe failed:\n{''.join(out)[-2000:]}")
    return time.time() - last


def exit_figures(overrides: list[str], repeats: int) -> tuple[float, float]:
    """Exit of one short run: the command as users run it, against the same main() called
    plainly (the interpreter's full teardown); alternated, medians."""
    run = ["trainer.epochs=1", *overrides]  # a single run (the default config)
    ours, plain = [], []
    for _ in range(repeats):
        ours.append(exit_seconds([sys.executable, "-m", "fmnist_sweep", *run]))
        plain.append(exit_seconds([sys.executable, "-c", PLAIN_EXIT, *run]))
    return statistics.median(ours), statistics.median(plain)


def start_and_exit(data: list[str], quick: bool) -> None:
    """Print the start-up and exit figures of a single run."""
    real = ["data.root=/usr/share/datasets/fashion-mnist"] if Path(
        "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").is_file() and not quick else data
    start = startup_seconds(real, 0 if quick else 3)
    print(f"start-up, `python -m fmnist_sweep` -> first training step "
          f"({'one process, decoding included' if quick else 'decoded data cached'}, "
          f"{'full Fashion-MNIST' if real is not data else 'tiny data'}): {start:.2f} s (target <= 10 s)")
    lean = ["tracking.plots=false", "tracking.log_models=none"] if quick else []  # (quick: its shape, not the record)
    ours, plain = exit_figures(data + lean, 1 if quick else 3)
    print(f"exit, last output line -> process gone (a 1-epoch run, tiny data): {ours:.2f} s; "
          f"baseline, the same main() with the interpreter's full teardown: {plain:.2f} s")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--storages", default="sqlite,journal,postgres")
    ap.add_argument("--tracking", default="local,server")
    ap.add_argument("--pg-url", default=os.environ.get("FMNIST_TEST_PG_URL"),
                    help="an admin URL of a PostgreSQL server (a fresh database is made beside it)")
    ap.add_argument("--log-models", default="best", choices=("best", "all"),
                    help="tracking.log_models: which trials log their MLflow Model")
    ap.add_argument("--without-record", action="store_true",
                    help="each line also measured with no MLflow Model and no dataset inputs logged (the baseline "
                         "of that record), side by side")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.trials, args.epochs, args.storages, args.tracking = 3, 2, "sqlite", "local"
    storages = [s for s in args.storages.split(",") if s != "postgres" or args.pg_url]
    if "postgres" in args.storages and not args.pg_url:
        print("postgres skipped: give --pg-url (or set FMNIST_TEST_PG_URL)")

    work = Path(tempfile.mkdtemp(prefix="fmnist-orch-"))
    os.chdir(work)
    os.environ["FMNIST_SWEEP_DIR"] = str(work)
    tiny_idx(work / "data", *((100, 50) if args.quick else ()))
    data = [f"data.root={work / 'data'}", "data.verify=false", "data.download=false", "data.train_fraction=1.0",
            "data.val_fraction=0.2"]
    stand_ins()
    instrument("artifacts", "mlflow", "optuna", "model")

    server = None
    if "server" in args.tracking:
        server, uri = start_mlflow_server(work)
        os.environ["MLFLOW_TRACKING_URI"] = uri
    start_and_exit(data, args.quick)
    base = noop_ms(max(args.trials, 20))
    print(f"{args.trials} trials per line (median), {args.epochs} epochs of metrics each, standard artifacts; "
          f"baseline: no-op Optuna objective in memory, {base:.2f} ms/trial")
    print(f"tracking.log_models={args.log_models}")
    print(f"{'storage + tracking':<40}{'ms/trial':>10}{'optuna':>9}{'mlflow':>9}{'artifacts':>11}{'model':>8}"
          f"{'logged':>8}{'other':>8}{'% of 30 s trial':>17}")
    try:
        for tracking in args.tracking.split(","):
            for storage in storages:
                over = [*data, f"storage={storage}", f"tracking={tracking}", f"tracking.log_models={args.log_models}"]
                if storage == "postgres":
                    os.environ["FMNIST_STORAGE_URL"] = fresh_database(args.pg_url, f"bench_orch_{tracking}")
                for record in (True, False) if args.without_record else (True,):
                    label = f"{storage} + {tracking}" + ("" if record else " without record")
                    with no_record(not record):
                        m = measure(label, over, args.trials, args.epochs)
                    row(label, m, base, args.trials)
    finally:
        if server:
            server.terminate()
            server.wait(30)
    print("ms/trial = median trial cycle without model logging + its mean (model; logged: trials that "
          "logged one) - no-op baseline; other = compose, suggest, model build, pruning reports, progress line")


@contextlib.contextmanager
def no_record(on: bool):
    """With ``on``: runs log no MLflow Model and no dataset inputs (the baseline of that record)."""
    from fmnist_sweep import served
    from fmnist_sweep.tracking import Tracker

    kept = served.log, Tracker.log_datasets
    if on:
        served.log, Tracker.log_datasets = (lambda *a, **k: None), (lambda *a, **k: None)
    try:
        yield
    finally:
        served.log, Tracker.log_datasets = kept


def row(label: str, m: dict, base: float, trials: int) -> None:
    """One line of the table."""
    total = (m["total"] * 1000) - base
    parts = {k: m.get(k, 0) * 1000 for k in ("optuna", "mlflow", "artifacts", "model")}
    other = total - sum(parts.values())
    print(f"{label:<40}{total:>10.0f}{parts['optuna']:>9.0f}{parts['mlflow']:>9.0f}"
          f"{parts['artifacts']:>11.0f}{parts['model']:>8.0f}{m['logged']:>5}/{trials:<2}"
          f"{other:>8.0f}{100 * total / 1000 / TRIAL_SECONDS:>16.2f}%", flush=True)


if __name__ == "__main__":
    main()
