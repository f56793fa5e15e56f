"""Command line: one run, a study, or a look at a study.

    python -m fmnist_sweep [options] [override ...]      one run, or a study when a sweep is set
    python -m fmnist_sweep status STUDY [override ...]   the study's trials
    python -m fmnist_sweep report STUDY [override ...]   refresh its MLflow artifacts, print its summary
    python -m fmnist_sweep finalize STUDY [...]          retrain its best on train+val, test, register
    python -m fmnist_sweep compare NAME [NAME ...]       families, levels over seeds, per-class tables
    python -m fmnist_sweep workers -n N [override ...]   N local workers of one study
    python -m fmnist_sweep predict MODEL_URI IMAGES      classes of images from a logged model
    python -m fmnist_sweep storage-proxy [override ...]   Optuna's gRPC storage proxy for many workers
"""

from __future__ import annotations

import os
import signal
import shlex
import sys
import time

STARTED = time.time()  # a time budget counts from the command's start, its imports included

USAGE = """usage: python -m fmnist_sweep [options] [override ...]
       python -m fmnist_sweep status STUDY [override ...]
       python -m fmnist_sweep report STUDY [override ...]
       python -m fmnist_sweep finalize STUDY [--top-k K] [--seeds S] [override ...]
       python -m fmnist_sweep compare NAME [NAME ...] [--out DIR] [override ...]
       python -m fmnist_sweep workers [-n N] [--per-gpu K] [override ...]
       python -m fmnist_sweep predict MODEL_URI IMAGES [override ...]
       python -m fmnist_sweep storage-proxy [--host H] [--port P] storage=postgres

Train one model with the configuration Hydra composes from conf/ and the
overrides (key=value, group=option), recording the run in MLflow. With a sweep
(e.g. +experiment=autoencoder_latent) run an Optuna study instead; running the
same command again resumes it. With a time budget (+experiment=best
budget.hours=H or budget.minutes=M) plan, search, train the final models and
register the best by the deadline.

examples:
  python -m fmnist_sweep
  python -m fmnist_sweep model=bilstm optimizer=adam optimizer.lr=0.01 trainer.epochs=3
  python -m fmnist_sweep +experiment=quickstart
  python -m fmnist_sweep +experiment=quickstart --more 5
  python -m fmnist_sweep -m optimizer.lr=1e-3,1e-2 model=cnn,rnn
  python -m fmnist_sweep +experiment=best budget.hours=2
  python -m fmnist_sweep status quickstart
  python -m fmnist_sweep finalize quickstart --top-k 3 --seeds 3 trainer.epochs=15
  python -m fmnist_sweep compare torch_ae_latent
  python -m fmnist_sweep compare resnet_search 0123456789abcdef0123456789abcdef --out results/
  python -m fmnist_sweep workers -n 2 +experiment=cnn_arch storage=postgres tracking=server
  python -m fmnist_sweep predict models:/fmnist-quickstart/1 shirt.png

options:
  --more N     run N trials more than the study has (default: fill its n_trials)
  --fork       the sweep's search space changed: start a new study beside the old one
  --top-k K    finalize: how many of the best configurations to retrain (default 3)
  --seeds S    finalize: seeds per configuration (default 3)
  --out DIR    compare: also write the Markdown, plots and tables into DIR
  -n N         workers: how many (default: one per GPU slot, else one 1-thread worker
               per core; CPU cores are split so that workers x threads = cores)
  --per-gpu K  workers: how many share one GPU (default 1)
  --host H     storage-proxy: the address to listen on (default 127.0.0.1; 0.0.0.0: all)
  --port P     storage-proxy: the port (default 13000; workers: storage.proxy.port=P)
  -m           Hydra's multirun: a study of the sweeping overrides (a,b lists and ranges:
               the grid; interval(): TPE, hydra.sweeper.n_trials=N), resumed by the same command
  --cfg        print the composed configuration and exit
  --verbose    show full tracebacks on errors (also HYDRA_FULL_ERROR=1)
  -h, --help   this text
"""

COMMANDS = ("status", "report", "finalize")
NUMBER_OPTIONS = {"--more": "more", "--top-k": "top_k", "--seeds": "seeds", "-n": "n", "--per-gpu": "per_gpu",
                  "--port": "port"}


def _browse_hint(tracking_uri: str, experiment_id: str, run_id: str | None = None, study=None) -> str:
    """How to look at the record in MLflow's UI: a link to the run's page, or to a study's trials
    in the model-training runs view, ranked by its (first) objective."""
    from urllib.parse import quote, urlencode

    base = tracking_uri.rstrip("/") if tracking_uri.startswith("http") else "http://127.0.0.1:5000"
    page = f"{base}/#/experiments/{experiment_id}/runs"
    if run_id:
        page += f"/{run_id}"
    elif study is not None:
        metric, direction = study.sweep.objectives[0]
        page += "?" + urlencode({"searchFilter": f"tags.`optuna.study` = '{study.name}' and "
                                                 "tags.`optuna.trial_number` LIKE '%'",
                                 "orderByKey": f"metrics.`{metric}`",
                                 "orderByAsc": str(direction == "minimize").lower()}, quote_via=quote)
    if tracking_uri.startswith("http"):
        return f"browse: {page}"
    return f"browse: mlflow ui --backend-store-uri {tracking_uri}, then open {page}"


def _parse(argv: list[str]):
    """(options, Hydra overrides) from the command line; a bad option is a UserError."""
    from .errors import UserError

    opts = {"verbose": False, "cfg": False, "fork": False, "multirun": False, "more": None, "top_k": 3, "seeds": 3,
            "n": None, "per_gpu": 1, "command": None, "study": None, "names": [], "out": None,
            "host": "127.0.0.1", "port": 13000}
    rest, i = [], 0
    if argv and argv[0] in ("workers", "storage-proxy"):
        opts["command"], i = argv[0], 1
    elif argv and argv[0] == "compare":
        opts["command"], i = "compare", 1
        while i < len(argv) and "=" not in argv[i] and not argv[i].startswith("-"):
            opts["names"].append(argv[i])
            i += 1
        if not opts["names"]:
            raise UserError("usage: python -m fmnist_sweep compare NAME [NAME ...] [--out DIR] [override ...] "
                            "(NAME: a study, or an MLflow run id)")
    elif argv and argv[0] == "predict":
        if len(argv) < 3 or any("=" in a or a.startswith("-") for a in argv[1:3]):
            raise UserError("usage: python -m fmnist_sweep predict MODEL_URI IMAGES [override ...] (IMAGES: a "
                            "PNG/JPEG file, a folder of them, or an IDX file)")
        opts["command"], opts["names"], i = "predict", argv[1:3], 3
    elif argv and argv[0] in COMMANDS:
        if len(argv) < 2 or "=" in argv[1] or argv[1].startswith("-"):
            raise UserError(f"usage: python -m fmnist_sweep {argv[0]} STUDY [override ...]")
        opts["command"], opts["study"], i = argv[0], argv[1], 2
    while i < len(argv):
        a = argv[i]
        if a in ("--verbose", "--cfg", "--fork"):
            opts[a[2:]] = True
        elif a in ("-m", "--multirun"):
            opts["multirun"] = True
        elif a == "--host":
            if opts["command"] != "storage-proxy" or i + 1 >= len(argv):
                raise UserError("--host H goes with storage-proxy: python -m fmnist_sweep storage-proxy --host 0.0.0.0")
            opts["host"], i = argv[i + 1], i + 1
        elif a == "--out":
            if opts["command"] != "compare" or i + 1 >= len(argv):
                raise UserError("--out DIR goes with compare: python -m fmnist_sweep compare NAME --out DIR")
            opts["out"], i = argv[i + 1], i + 1
        elif a in NUMBER_OPTIONS:
            if i + 1 >= len(argv) or not argv[i + 1].isdigit() or int(argv[i + 1]) < 1:
                raise UserError(f"{a} takes a number >= 1, e.g. {a} 3")
            opts[NUMBER_OPTIONS[a]], i = int(argv[i + 1]), i + 1
        elif a.startswith("-"):
            raise UserError(f"unknown option {a}; see --help")
        else:
            rest.append(a)
        i += 1
    if opts["multirun"]:
        from .hydra_sweeper import multirun

        rest = multirun(rest)
    return opts, rest


def entry() -> None:
    """The command (`python -m fmnist_sweep`, `fmnist-sweep`): main(), then the exit. Before
    it, every live object is moved out of the garbage collector's sight (gc.freeze): the
    interpreter's teardown would otherwise run full collections over the many objects torch,
    MLflow and plotly leave, seconds of every exit (bench/orchestration.py measures it).
    Exit handlers and flushes still run; only cycles left at exit are not collected.
    SIGTERM and SIGHUP stop it as Ctrl-C does (errors.stop_on_signals)."""
    from .errors import stop_on_signals

    stop_on_signals()
    code = main()
    import gc

    gc.freeze()
    leave(code)


def leave(code: int) -> None:
    """Exit with ``code``. A stop can cut a library's non-daemon thread off from the code that
    ends it (Optuna's heartbeat thread, when the stop lands as a trial's heartbeat starts), and
    the interpreter's exit would wait for that thread for ever: after a stop (a code above 128)
    with such a thread alive, the process exits at once, its output flushed."""
    import threading

    if code > 128 and any(t.is_alive() and not t.daemon for t in threading.enumerate()
                          if t is not threading.main_thread()):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def main(argv: list[str] | None = None) -> int:
    """Run the command in ``argv``; returns the exit code (2: a user's error, 130: Ctrl-C, 128 + N:
    stopped by signal N, 143 for SIGTERM)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    from .workers import pin_to_cores

    pin_to_cores()
    verbose = "--verbose" in argv or os.environ.get("HYDRA_FULL_ERROR") == "1"
    if "-h" in argv or "--help" in argv:
        print(USAGE)
        return 0
    from .errors import UserError, stop_name, stop_signal

    opts = {}
    try:
        opts, overrides = _parse(argv)
        if opts["command"] and opts["command"] not in ("workers", "storage-proxy"):
            return _study_command(opts, overrides)
        from .config import compose

        cfg = compose(overrides)
        if opts["command"] == "storage-proxy":
            from .storage import serve_proxy

            serve_proxy(cfg.storage, opts["host"], opts["port"])
            return 0
        if opts["command"] == "workers":
            if cfg.sweep is None:
                raise UserError("workers run a study: add +experiment=NAME (or sweep=NAME)")
            from . import forks

            forks.start()  # the workers' server imports on a core beside this process's study set-up
            from .workers import launch

            return launch(cfg, overrides, opts["n"], opts["per_gpu"], opts["more"])
        if opts["cfg"]:
            from omegaconf import OmegaConf

            print(OmegaConf.to_yaml(cfg), end="")
            return 0
        from .config import budget_seconds

        if budget_seconds(cfg) is not None:
            return _best(cfg, overrides)
        if cfg.sweep is not None:
            return _run_study(cfg, overrides, opts["more"], opts["fork"])
        if opts["more"] is not None or opts["fork"]:
            raise UserError("--more and --fork apply to studies: add +experiment=NAME or sweep=NAME")
        return _run_one(cfg, overrides, verbose)
    except UserError as e:
        if verbose:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        signum = stop_signal(e)
        why = "interrupted" if signum == signal.SIGINT else f"stopped by {stop_name(e)}"
        print("storage proxy stopped" if opts.get("command") == "storage-proxy" else
              f"{why}: the MLflow run is marked KILLED; a study resumes with the same command", file=sys.stderr)
        return 128 + signum


def _best(cfg, overrides) -> int:
    """+experiment=best: the run server (forks.py) starts importing on a core beside this
    process's own imports, which the budget's first measurement then waits for."""
    from . import forks

    forks.start()
    from . import best

    return best.run(cfg, overrides, STARTED)


def _run_one(cfg, overrides, verbose) -> int:
    """One training run; prints its result and how to browse it."""
    from .tracking import local_uri
    from .record import run

    t0 = time.perf_counter()
    result = run(cfg, overrides, log_model=cfg.tracking.get("log_models", "best") != "none")
    shown = ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items() if k.startswith(("val/", "test/")))
    print(f"run {result.run_id} {result.status} in {time.perf_counter() - t0:.1f} s: {shown}")
    if result.status != "FINISHED":
        print(f"error: {result.message}", file=sys.stderr)
        if verbose and result.traceback:
            print(result.traceback, file=sys.stderr)
    if result.model_id:
        print(f"model: models:/{result.model_id} (predict: python -m fmnist_sweep predict runs:/{result.run_id} IMAGES)")
    print(_browse_hint(local_uri(cfg.tracking.uri), result.experiment_id, run_id=result.run_id))
    return 0 if result.status == "FINISHED" else 1


def _run_study(cfg, overrides, more, fork) -> int:
    """A study's trials in this process, then its report and the best trial's re-run command."""
    from . import study_report
    from .study import Study

    t0 = time.perf_counter()
    study = Study(cfg, overrides, fork=fork)
    publish = "FMNIST_WORKER" not in os.environ  # under `workers`, the launcher publishes once
    try:
        study.optimize(more)
    except KeyboardInterrupt:
        raise  # one line (main); the next run resumes and reports
    except BaseException:
        if publish:  # what the study has so far; never in place of the error that stopped it
            try:
                study_report.publish(study)
            except Exception as e:
                print(f"warning: the study report was not refreshed ({type(e).__name__}); later: "
                      + shlex.join(["python", "-m", "fmnist_sweep", "report", study.name, *_where(overrides)]),
                      file=sys.stderr)
        raise
    if publish:  # (under `workers`, the launcher says how the study ended)
        study.reconnecting(lambda: study_report.publish(study))
        study_outcome(study, t0)
    return 0


def study_outcome(study, t0: float, more: str = "") -> None:
    """A finished study's last lines: its counts and time, the best trial's re-run command, where
    MLflow keeps it."""
    from .study import states
    from .tracking import local_uri

    c, best = study.summary()
    print(f"\nstudy {study.name}: {states(c)} in {time.perf_counter() - t0:.0f} s{more}")
    for t in best:
        values = ", ".join(f"{m} {v:.4f}" for (m, _), v in zip(study.sweep.objectives, t.values))
        print(f"best trial {t.number}: {values}\n  re-run: python -m fmnist_sweep {t.user_attrs.get('overrides', '')}")
    print(f"MLflow: experiment '{study.name}', parent run {study.parent_run_id} (plots and trials.csv there)")
    print(_browse_hint(local_uri(study.cfg.tracking.uri), study.tracker.experiment_id, study=study))


def _where(overrides) -> list[str]:
    """The overrides that say where studies and runs are kept."""
    return [o for o in overrides if o.lstrip("+~").startswith(("storage", "tracking", "work_dir"))]


def _study_command(opts, overrides) -> int:
    """status, report, finalize or compare of existing studies."""
    from . import study_report
    from .study import open_study

    command = opts["command"]
    if command == "predict":
        from .config import compose
        from .predict import predict

        print(predict(*opts["names"], compose(_where(overrides)).tracking.uri), end="")
        return 0
    if command == "compare":
        from .compare import compare

        text, run_id = compare(opts["names"], overrides, opts["out"])
        print(text, end="")
        print(f"\nMLflow: experiment 'compare', run {run_id}" + (f"; files in {opts['out']}" if opts["out"] else ""))
        return 0
    # Storage and tracking overrides select the study; the rest size the final retraining.
    where = _where(overrides)
    study = open_study(where, opts["study"])
    if command == "finalize":
        from .finalize import finalize

        extra = [o for o in overrides if o not in where]
        print(finalize(study, opts["top_k"], opts["seeds"], extra), end="")
        return 0
    if command == "report":
        study_report.publish(study)
        print(study_report.markdown(study), end="")
        print(f"\nartifacts refreshed on MLflow run {study.parent_run_id} (experiment '{study.name}')")
    else:
        print(study_report.markdown(study), end="")
    return 0
