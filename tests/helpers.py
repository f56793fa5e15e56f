"""Helpers the tests share: tiny IDX files, the study and MLflow records as a user reads
them, and waiting for a server. Fixtures are in conftest.py."""

import gzip
import hashlib
import os
import textwrap
from pathlib import Path

import numpy as np

from fmnist_sweep.data import FILES

REAL_DATA = Path(os.environ.get("FMNIST_REAL_DATA", "/usr/share/datasets/fashion-mnist"))
# The real config shrunk to seconds on the tiny files (with data.root=their folder).
TINY = ["data.verify=false", "data.download=false", "data.val_fraction=0.2", "trainer.epochs=1",
        "trainer.batch_size=32", "trainer.threads=1"]


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


def interruptible() -> None:
    """Popen's preexec_fn for a child the test will Ctrl-C: SIGINT's default action, even where
    the test process inherited it ignored (a shell's background job), so that the child's
    Python turns SIGINT into KeyboardInterrupt."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)

