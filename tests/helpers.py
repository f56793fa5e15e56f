"""Helpers the tests share: tiny IDX files, the study and MLflow records as a user reads
them, and waiting for a server. Fixtures are in conftest.py."""

import gzip
import hashlib
import os
import textwrap
from pathlib import Path

import numpy as np

from fmnist_sweep import forks
from fmnist_sweep.data import FILES

REAL_DATA = Path(os.environ.get("FMNIST_REAL_DATA", "/usr/share/datasets/fashion-mnist"))
# The real config shrunk to seconds on the tiny files (with data.root=their folder).
# A lean record: no plots and no study trial's MLflow Model (the tests of those ask for them: RECORD).
LEAN = ["tracking.plots=false", "tracking.log_models=none"]
RECORD = ["tracking.plots=true", "tracking.log_models=best"]
TINY = ["data.verify=false", "data.download=false", "data.val_fraction=0.2", "trainer.epochs=1",
        "trainer.batch_size=32", "trainer.threads=1", *LEAN]


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx(folder: Path, n_train_per_class=10, n_test_per_class=6, seed=0) -> dict[str, str]:
    """Four gzipped IDX files of learnable fake images: each class is a bright
    horizontal band at its own height, plus noise. Returns their SHA-256 table."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    checksums = {}

    def images_for(labels):
        x = rng.integers(0, 60, size=(len(labels), 28, 28))
        for i, c in enumerate(labels):
            x[i, 2 + 2 * c: 5 + 2 * c, :] = 230
        return x

    arrays = {}
    for split, per_class in (("train", n_train_per_class), ("test", n_test_per_class)):
        labels = rng.permutation(np.repeat(np.arange(10), per_class))
        arrays[f"{split}_images"] = images_for(labels)
        arrays[f"{split}_labels"] = labels
    for key, (name, _) in FILES.items():
        raw = idx_bytes(arrays[key])
        (folder / name).write_bytes(gzip.compress(raw))
        checksums[name] = hashlib.sha256(raw).hexdigest()
    return checksums


def mlflow_runs(workdir: Path, experiment="fmnist-sweep"):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlruns.db'}")
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, "no MLflow experiment was created"
    return client, client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])


def _read_only(db: Path, sql: str, args: tuple = ()) -> list | None:
    """The rows of ``sql`` on the SQLite file ``db``, opened read-only (never making the file or its
    tables beside the command that owns it); None while it has neither."""
    import sqlite3

    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
            return con.execute(sql, args).fetchall()
    except sqlite3.OperationalError:
        return None


def epochs_logged(workdir: Path, role: str = "trial") -> dict[str, int]:
    """Epochs logged so far by each trial's run (keyed by trial number) or, with role="final", each
    final model's run (keyed by run id), read straight from MLflow's SQLite store: cheap enough to
    poll every few milliseconds."""
    key, where = (("t.value", "t.key = 'optuna.trial_number'") if role == "trial" else
                  ("m.run_uuid", "t.key = 'fmnist.role' and t.value = 'final'"))
    return dict(_read_only(workdir / "mlruns.db", f"select {key}, count(*) from metrics m join tags t on "
                           f"m.run_uuid = t.run_uuid where m.key = 'train/loss' and {where} group by m.run_uuid") or [])


def made_study(workdir: Path, name: str):
    """The study ``name`` of the work dir's embedded storage once a command has made it, else None
    (loaded only then: loading it first would make its tables beside the command)."""
    import optuna

    if not _read_only(workdir / "studies.db", "SELECT 1 FROM studies WHERE study_name = ?", (name,)):
        return None
    return optuna.load_study(study_name=name, storage=storage(workdir))


def storage(workdir):
    """The embedded default's study storage in a work dir."""
    return f"sqlite:///{workdir / 'studies.db'}"


def trials(workdir, name):
    import optuna

    return optuna.load_study(study_name=name, storage=storage(workdir)).trials


def enter_workdir(mp, wd: Path, cache: Path) -> None:
    """``wd`` the current directory and work dir, ``cache`` the decoded-data cache, until the
    pytest MonkeyPatch ``mp`` undoes it."""
    mp.chdir(wd)
    mp.setenv("FMNIST_CACHE_DIR", str(cache))
    mp.delenv("FMNIST_DATA_DIR", raising=False)
    mp.delenv("FMNIST_SWEEP_DIR", raising=False)


def sweep_file(tmp_path, text, name="mine"):
    p = tmp_path / f"{name}.yaml"
    p.write_text(textwrap.dedent(text))
    return p


def lr_sweep(tmp_path, n_trials, name="mine"):
    """The plainest study: random search over the learning rate."""
    return sweep_file(tmp_path, f"""
        objective: val/accuracy
        n_trials: {n_trials}
        sampler: {{name: random, seed: 0}}
        params:
          optimizer.lr: tag(log, interval(1e-4, 1e-2))
    """, name)


def wait_http(url: str, proc, seconds: float = 120, what: str = "server") -> None:
    """Until ``url`` answers, or fail if ``proc`` exits or time runs out."""
    import time
    import urllib.request

    deadline = time.time() + seconds
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise AssertionError(f"{what} did not answer at {url}")
            time.sleep(0.5)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the CLI as a real process without an interpreter's start-up -------------------------------
# What a command imports, once per test process: a run's process's (forks.PRELOAD), and what the
# commands import later (their record, report and model export), so that forked ones import nothing.
FORK_PRELOAD = [*forks.PRELOAD, "fmnist_sweep.cli", "fmnist_sweep.best", "fmnist_sweep.workers", "torch.export",
                "mlflow.pytorch", "mlflow.store.model_registry.sqlalchemy_store", "matplotlib.pyplot",
                "optuna.visualization", "optuna.visualization.matplotlib", "tests.helpers"]


class Forked:
    """`python -m fmnist_sweep ARGS` in ``cwd`` with the environment ``env`` as a process of its
    own (signals, kill -9, exit codes and output as a command's), forked from this test process's
    multiprocessing forkserver (fmnist_sweep/forks.py) instead of a new interpreter: what
    ``python -m`` itself does is tested in tests/test_cli_errors.py. Popen's ways: ``pid``,
    ``stdout`` and ``stderr`` (None with ``merge``: standard error into stdout), ``send_signal``,
    ``wait``, ``communicate``, ``returncode`` (minus the signal that killed it)."""

    def __init__(self, args: list[str], cwd=None, env: dict | None = None, merge: bool = False):
        import multiprocessing
        import socket

        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(FORK_PRELOAD)  # (where the server already runs: no effect)
        out, out_child = socket.socketpair()
        err, err_child = (None, None) if merge else socket.socketpair()
        self.process = ctx.Process(target=_cli_child, args=(list(args), str(cwd or os.getcwd()), dict(env or os.environ),
                                                                 out_child, err_child))
        self.process.start()
        self.pid = self.process.pid
        for s in (out_child, err_child):
            if s is not None:
                s.close()
        self.stdout = out.makefile("r", encoding="utf-8", errors="replace")
        self.stderr = err.makefile("r", encoding="utf-8", errors="replace") if err else None
        self._sockets = [s for s in (out, err) if s is not None]

    @property
    def returncode(self) -> int | None:
        return self.process.exitcode

    def poll(self) -> int | None:
        return self.returncode

    def send_signal(self, sig) -> None:
        os.kill(self.pid, sig)

    def kill(self) -> None:
        """SIGKILL, unless the process has ended (and multiprocessing, starting another, reaped it)."""
        import signal

        if self.process.exitcode is None:
            self.send_signal(signal.SIGKILL)

    def wait(self, timeout: float | None = None) -> int:
        import subprocess

        self.process.join(timeout)
        if self.process.exitcode is None:
            raise subprocess.TimeoutExpired(f"fmnist_sweep (pid {self.pid})", timeout)
        return self.process.exitcode

    def communicate(self, timeout: float | None = None) -> tuple[str, str | None]:
        """Everything still to come on stdout and stderr, once the process has exited (what came
        within ``timeout`` where it has not: a hung command's last lines)."""
        import threading

        got = {f: [] for f in (self.stdout, self.stderr) if f is not None}
        readers = [threading.Thread(target=lambda f=f: got[f].extend(f), daemon=True) for f in got]
        for r in readers:
            r.start()
        try:
            self.wait(timeout)
        finally:
            for r in readers:
                r.join(timeout)
        for s in self._sockets:
            s.close()
        return "".join(got[self.stdout]), "".join(got[self.stderr]) if self.stderr else None


def stop_when(proc: "Forked", ready, sig, seconds: float = 120) -> None:
    """Send ``sig`` to ``proc`` as soon as ``ready()`` holds, then wait for it to end. An
    AssertionError with its output where it ended first, ``ready()`` did not hold within
    ``seconds``, or the signal did not end it within 60 s."""
    import signal
    import subprocess
    import time

    deadline = time.time() + seconds
    while not ready():
        if proc.poll() is not None or time.time() > deadline:
            if proc.poll() is None:
                proc.kill()
            raise AssertionError(f"the command ended, or ran {seconds:.0f} s, before it could be stopped: "
                                 f"{proc.communicate(10)}")
        time.sleep(0.01)
    proc.send_signal(sig)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"{signal.Signals(sig).name} did not end the command in 60 s: {proc.communicate(30)}")


def run_cli(args: list[str], cwd=None, env: dict | None = None, timeout: float = 600):
    """Forked ``args`` to its end: a subprocess.CompletedProcess (returncode, stdout, stderr)."""
    import subprocess

    proc = Forked(args, cwd, env)
    out, err = proc.communicate(timeout)
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def _cli_child(argv, cwd, env, out, err) -> None:
    import signal

    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C as in a terminal
    os.chdir(cwd)
    forks.cli_child(argv, env, out, err)
