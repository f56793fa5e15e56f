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
    out = bench("train_throughput.py", "--models", "cnn,rnn,resnet", "--profile", "cnn")
    assert "large-GEMM peak (GFLOP/s, matmul / 3x3 conv): fp32" in out and "baseline" in out
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith(("cnn ", "rnn ", "resnet "))}
    assert set(rows) == {"cnn", "rnn", "resnet"}
    assert "(bf16)" in rows["cnn"] or "(fp32)" in rows["cnn"]
    assert rows["cnn"].count("x") == 2 and rows["cnn"].rstrip().endswith("%")
    assert "profile of cnn" in out and "convolution + matmul" in out


def test_trial_breakdown_quick(workdir, tiny_data):
    out = bench("trial_breakdown.py", f"data.root={tiny_data}", "data.verify=false", "data.val_fraction=0.2",
                "data.train_fraction=1.0")
    for bucket in ("train", "evaluate", "mlflow logging", "optuna storage", "artifact rendering"):
        assert bucket in out


def test_workers_quick(workdir, tiny_data):
    out = bench("workers.py", f"data.root={tiny_data}", "data.verify=false", "data.val_fraction=0.2",
                "data.train_fraction=1.0")
    assert "1 worker(s)" in out and "2 worker(s)" in out and "trials/hour" in out
    assert "without -n starts" in out


def test_orchestration_quick(workdir):
    out = bench("orchestration.py")
    assert "start-up" in out and "no-op Optuna objective" in out
    assert any(line.startswith("sqlite + local") and line.rstrip().endswith("%") for line in out.splitlines())


def test_sweep_efficiency_quick(workdir, tiny_data, tmp_path):
    out = bench("sweep_efficiency.py", f"data.root={tiny_data}", "data.verify=false", "data.val_fraction=0.2",
                "data.train_fraction=1.0", "--plot", str(tmp_path / "eff.png"))
    for arm in ("tpe + median pruner", "tpe, no pruning", "random, no pruning"):
        assert arm in out
    assert "epochs saved by pruning" in out and (tmp_path / "eff.png").stat().st_size > 0


def test_bf16_accuracy_quick(workdir, tiny_data):
    out = bench("bf16_accuracy.py", f"data.root={tiny_data}", "data.verify=false", "data.val_fraction=0.2",
                "data.train_fraction=1.0")
    assert "seed 0 fp32: val/accuracy" in out and "seed 0 bf16: val/accuracy" in out
    assert "points of val/accuracy on average over 1 seed(s)" in out
