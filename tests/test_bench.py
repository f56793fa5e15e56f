"""The benchmarks' --quick modes, so they do not rot (no timing is asserted)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def bench(name, *args, cwd=None):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / name), "--quick", *args], capture_output=True,
                          text=True, timeout=600, cwd=cwd)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout


def test_train_throughput_quick():
    out = bench("train_throughput.py", "--models", "cnn,rnn")
    assert "baseline fp32" in out and out.count("x") >= 4
    assert any(line.startswith("cnn ") for line in out.splitlines())


def test_trial_breakdown_quick(workdir, tiny_data):
    out = bench("trial_breakdown.py", f"data.root={tiny_data}", "data.verify=false", "data.val_fraction=0.2",
                "data.train_fraction=1.0")
    for bucket in ("train", "evaluate", "mlflow logging", "optuna storage", "artifact rendering"):
        assert bucket in out


def test_workers_quick(workdir, tiny_data):
    out = bench("workers.py", f"data.root={tiny_data}", "data.verify=false", "data.val_fraction=0.2",
                "data.train_fraction=1.0")
    assert "1 worker(s)" in out and "2 worker(s)" in out and "trials/hour" in out
