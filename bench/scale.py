"""Many workers on one study: the storage and the sampler under N concurrent simulated
workers. Each worker is a thread with its own storage client that runs the study's real
TPE sampler and storage calls (ask, four suggestions, tell) around a stand-in objective of
a few milliseconds (no torch); workers are spread over a few processes so that sampling
uses every core. Per storage, study history (COMPLETE trials already in it) and N:
trials/s, p50/p99 latency of ask+tell as a worker waits for it, and the storage server's
CPU share (its processes' CPU time over wall time x cores, read from /proc).

    python bench/scale.py --pg-url postgresql://postgres@127.0.0.1:5432/postgres --plot docs/scale.png
    python bench/scale.py --quick --pg-url ...      # N = 2 in one process; history 20; 0.5 s each
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import optuna

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pgdb import drop_database, fresh_database  # noqa: E402

optuna.logging.set_verbosity(optuna.logging.WARNING)
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

OBJECTIVE_SECONDS = 0.005
TRIAL_SECONDS = 30.0  # the reference trial of the 5% criterion
SERVERS = {"postgres": "postgres", "grpc": "postgres", "redis": "redis-server"}  # process names behind each


def storage_for(kind: str, where: dict):
    """A new storage client of ``kind``, as one worker opens it."""
    if kind == "postgres":
        return optuna.storages.RDBStorage(where["url"], engine_kwargs={"pool_size": 1, "max_overflow": 1})
    if kind == "grpc":
        return optuna.storages.GrpcStorageProxy(host="127.0.0.1", port=where["port"])
    from optuna.storages.journal import JournalRedisBackend, JournalStorage

    return JournalStorage(JournalRedisBackend(where["redis"], prefix=where["prefix"]))


def worker_thread(kind, where, study_name, stop_at, out, errors):
    """One simulated worker: ask, suggest, a few ms of work, tell, until ``stop_at``; a worker
    the storage refuses (e.g. PostgreSQL's max_connections reached) counts in ``errors``."""
    try:
        _work(kind, where, study_name, stop_at, out)
    except Exception as e:
        errors.append(f"{type(e).__name__}: {str(e).splitlines()[0][:120]}")


def _work(kind, where, study_name, stop_at, out):
    study = optuna.load_study(study_name=study_name, storage=storage_for(kind, where),
                              sampler=optuna.samplers.TPESampler(seed=threading.get_ident() % 2**31))
    while time.time() < stop_at:
        t0 = time.perf_counter()
        trial = study.ask()
        x = [trial.suggest_float("lr", 1e-4, 1e-1, log=True), trial.suggest_float("dropout", 0.0, 0.5),
             trial.suggest_categorical("optimizer", ["adam", "sgd", "rmsprop"]),
             trial.suggest_int("batch", 32, 256, log=True)]
        asked = time.perf_counter()
        time.sleep(OBJECTIVE_SECONDS)
        t1 = time.perf_counter()
        study.tell(trial, x[0] + x[1])
        out.append((asked - t0) + (time.perf_counter() - t1))


def worker_process(kind, where, study_name, threads, stop_at, queue):
    out: list[float] = []
    errors: list[str] = []
    pool = [threading.Thread(target=worker_thread, args=(kind, where, study_name, stop_at, out, errors))
            for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    queue.put((out, errors))


def server_cpu(name: str) -> float:
    """CPU seconds used so far by every process called ``name`` (user + system)."""
    total, tick = 0.0, os.sysconf("SC_CLK_TCK")
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        comm, rest = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
        if comm == name or (name == "proxy" and "storage-proxy" in _cmdline(pid)):
            total += (int(rest[11]) + int(rest[12])) / tick
    return total


def _cmdline(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def measure(kind, where, study_name, n, seconds, processes) -> dict:
    """N workers for ``seconds``: trials/s, latency percentiles, server CPU share."""
    per = [n // processes + (i < n % processes) for i in range(min(processes, n))]
    queue, stop_at = mp.Queue(), time.time() + 3 + seconds  # 3 s to start every worker
    procs = [mp.Process(target=worker_process, args=(kind, where, study_name, k, stop_at, queue)) for k in per]
    for p in procs:
        p.start()
    time.sleep(max(0.0, stop_at - seconds - time.time()))
    names = ["postgres", "proxy"] if kind == "grpc" else [SERVERS[kind]]
    cpu0, t0 = sum(map(server_cpu, names)), time.time()
    answers = [queue.get() for _ in procs]
    latencies = [x for out, _ in answers for x in out]
    errors = [e for _, errs in answers for e in errs]
    wall = time.time() - t0
    cpu = sum(map(server_cpu, names)) - cpu0
    for p in procs:
        p.join()
    lat = np.array(latencies) * 1000
    return {"trials_s": len(lat) / (seconds + 3), "p50": float(np.percentile(lat, 50)) if len(lat) else 0.0,
            "p99": float(np.percentile(lat, 99)) if len(lat) else 0.0,
            "server_cpu": cpu / (wall * os.cpu_count()), "failed": len(errors),
            "error": errors[0] if errors else ""}


def fill(storage, study_name: str, history: int) -> None:
    """A study with ``history`` COMPLETE trials over the same space."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    study = optuna.create_study(study_name=study_name, storage=storage)
    rng = np.random.default_rng(0)
    dists = {"lr": FloatDistribution(1e-4, 1e-1, log=True), "dropout": FloatDistribution(0.0, 0.5),
             "optimizer": CategoricalDistribution(["adam", "sgd", "rmsprop"]), "batch": IntDistribution(32, 256, log=True)}
    trials = []
    for _ in range(history):
        params = {"lr": float(10 ** rng.uniform(-4, -1)), "dropout": float(rng.uniform(0, 0.5)),
                  "optimizer": str(rng.choice(["adam", "sgd", "rmsprop"])), "batch": int(rng.integers(32, 257))}
        trials.append(optuna.trial.create_trial(params=params, distributions=dists,
                                                value=params["lr"] + params["dropout"]))
    for i in range(0, len(trials), 500):
        study.add_trials(trials[i:i + 500])


def start_proxy(url: str) -> tuple[subprocess.Popen, int]:
    """`python -m fmnist_sweep storage-proxy` in front of ``url``, on a free port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "fmnist_sweep", "storage-proxy", "--port", str(port),
                             "storage=postgres"], env=dict(os.environ, FMNIST_STORAGE_URL=url),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    optuna.storages.GrpcStorageProxy(host="127.0.0.1", port=port).wait_server_ready(timeout=60)
    return proc, port


def served_workers(rows: list[dict]) -> int:
    """Workers whose 30 s trials keep the storage under 5% (1.5 s) per trial, by a single-queue
    model: service time s (p50 at the fewest workers), capacity C (the most trials/s):
    latency s / (1 - load / C) <= 1.5 s at load N / 30 trials/s."""
    s = min(rows, key=lambda r: r["n"])["p50"] / 1000
    capacity = max(r["trials_s"] for r in rows)
    budget = 0.05 * TRIAL_SECONDS
    return max(0, int(TRIAL_SECONDS * capacity * (1 - s / budget))) if s < budget else 0


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    histories = sorted({r["history"] for r in results})
    fig, axes = plt.subplots(1, len(histories), figsize=(4.2 * len(histories), 3.6), sharey=True)
    for ax, h in zip(np.atleast_1d(axes), histories):
        for kind in dict.fromkeys(r["kind"] for r in results):
            rows = [r for r in results if r["kind"] == kind and r["history"] == h]
            ax.plot([r["n"] for r in rows], [r["trials_s"] for r in rows], marker="o", label=kind)
        ax.set_xscale("log", base=2)
        ax.set_title(f"history {h:,} trials")
        ax.set_xlabel("concurrent workers")
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[0].set_ylabel("trials/s (TPE, 5 ms objective)")
    np.atleast_1d(axes)[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pg-url", default=os.environ.get("FMNIST_TEST_PG_URL"),
                    help="an admin URL of a PostgreSQL server (a fresh database is made beside it)")
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    ap.add_argument("--workers", default="8,32,128")
    ap.add_argument("--histories", default="0,1000,5000")
    ap.add_argument("--storages", default="postgres,grpc,redis")
    ap.add_argument("--seconds", type=float, default=8)
    ap.add_argument("--processes", type=int, default=os.cpu_count())
    ap.add_argument("--plot", default=None)
    ap.add_argument("--plot-from", nargs="+", metavar="OUTPUT",
                    help="only plot the table lines of saved outputs of this script (runs of one storage each)")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.plot_from:
        plot(read_tables(args.plot_from), args.plot or "scale.png")
        return
    if args.quick:
        args.workers, args.histories, args.seconds, args.processes = "2", "20", 0.5, 1
    kinds = [k for k in args.storages.split(",") if args.pg_url or k == "redis"]
    if len(kinds) < len(args.storages.split(",")):
        print("postgres and grpc skipped: give --pg-url (or set FMNIST_TEST_PG_URL)")
    admin = args.pg_url.replace("+psycopg2", "") if args.pg_url else None
    url = fresh_database(admin, f"bench_scale_{os.getpid()}") if admin else None
    proxy, port = start_proxy(url) if "grpc" in kinds else (None, None)
    prefix = f"bench-scale-{os.getpid()}"
    where = {"url": url, "port": port, "redis": args.redis_url, "prefix": prefix}
    print(f"{os.cpu_count()} cores, {args.processes} worker processes; {args.seconds:g} s per line; stand-in "
          f"objective {OBJECTIVE_SECONDS * 1000:g} ms; latency = ask + tell as one worker waits for it")
    print(f"{'storage':<10}{'history':>9}{'workers':>9}{'trials/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'server CPU':>12}"
          f"{'refused':>9}")
    results = []
    try:
        for kind in kinds:
            for h in map(int, args.histories.split(",")):
                name = f"{kind}-h{h}"
                fill(storage_for("postgres" if kind == "grpc" else kind, where), name, h)
                for n in map(int, args.workers.split(",")):
                    r = {"kind": kind, "history": h, "n": n,
                         **measure(kind, where, name, n, args.seconds, args.processes)}
                    results.append(r)
                    print(f"{kind:<10}{h:>9,}{n:>9}{r['trials_s']:>10.1f}{r['p50']:>9.0f}{r['p99']:>9.0f}"
                          f"{100 * r['server_cpu']:>11.0f}%{r['failed']:>9}" + (f"  ({r['error']})" if r["failed"] else ""),
                          flush=True)
    finally:
        if proxy is not None:
            proxy.terminate()
            proxy.wait(30)
        _drop_redis(args.redis_url, prefix)
        if admin:
            drop_database(admin, url.rsplit("/", 1)[1])
    for kind in kinds:
        for h in map(int, args.histories.split(",")):
            rows = [r for r in results if r["kind"] == kind and r["history"] == h]
            print(f"{kind}, history {h:,}: workers with 30 s trials served within 5% per trial: about "
                  f"{served_workers(rows)}")
    if args.plot:
        plot(results, args.plot)
        print(f"plot: {args.plot}")


def read_tables(paths: list[str]) -> list[dict]:
    """The table lines of saved outputs: storage, history, workers, trials/s."""
    rows = []
    for path in paths:
        for line in Path(path).read_text().splitlines():
            cells = line.split()
            if cells and cells[0] in SERVERS and len(cells) >= 4 and cells[2].isdigit():
                rows.append({"kind": cells[0], "history": int(cells[1].replace(",", "")), "n": int(cells[2]),
                             "trials_s": float(cells[3])})
    return rows


def _drop_redis(url: str, prefix: str) -> None:
    import redis

    server = redis.Redis.from_url(url)
    keys = list(server.scan_iter(f"{prefix}:*"))
    if keys:
        server.delete(*keys)


if __name__ == "__main__":
    main()
