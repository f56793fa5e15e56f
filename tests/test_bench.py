"""The benchmarks' --quick modes, so they do not rot (no timing is asserted). Those that start
processes of their own run as scripts; the others in the test's process."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import LEAN  # (where the record is not what a bench measures)

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def bench_module(name):
    """A bench script imported as a module (bench/ is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def bench_here(name, *args, monkeypatch, capsys) -> str:
    """``python bench/NAME.py --quick ARGS`` in this process (its imports are the suite's): its
    standard output. What it changes is put back after: the current directory, $FMNIST_SWEEP_DIR
    (some point it at a folder of their own) and torch's thread count."""
    import os

    import torch

    monkeypatch.setattr(sys, "argv", [f"{name}.py", "--quick", *args])
    monkeypatch.chdir(os.getcwd())
    monkeypatch.setenv("FMNIST_SWEEP_DIR", os.getcwd())
    threads = torch.get_num_threads()
    try:
        bench_module(name).main()
    finally:
        torch.set_num_threads(threads)
    return capsys.readouterr().out


def bench(name, *args, cwd=None):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / name), "--quick", *args], capture_output=True,
                          text=True, timeout=600, cwd=cwd)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout


def test_train_throughput_quick(monkeypatch, capsys):
    out = bench_here("train_throughput", "--models", "cnn,rnn,resnet", "--profile", "cnn", monkeypatch=monkeypatch,
                     capsys=capsys)
    assert "large-GEMM peak (GFLOP/s, matmul / 3x3 conv): fp32" in out and "baseline" in out
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith(("cnn ", "rnn ", "resnet "))}
    assert set(rows) == {"cnn", "rnn", "resnet"}
    assert "(bf16)" in rows["cnn"] or "(fp32)" in rows["cnn"]
    assert rows["cnn"].count("x") == 3 and "%" in rows["cnn"] and rows["cnn"].rstrip().endswith("x")  # ceiling last
    assert "ceiling = the default ratio" in out
    assert "profile of cnn" in out and "convolution + matmul" in out


def test_throughput_baseline_is_built_from_torch_layers_only():
    """The tutorial baseline holds none of our CPU fast paths (a fast layer added to
    models.fast is stripped without being listed); the engine's build holds them."""
    tt = bench_module("train_throughput")
    from fmnist_sweep.models import fast

    for name in tt.BATCH:
        baseline, _ = tt.build(name, engine=False)
        assert not [m for m in baseline.modules() if type(m).__module__.startswith(fast.__name__ + ".")], name
    engine, _ = tt.build("cnn", engine=True)
    kinds = {type(m) for m in engine.modules()}
    assert fast.Dropout in kinds


def test_trial_breakdown_quick(workdir, tiny_data, monkeypatch, capsys):
    out = bench_here("trial_breakdown", f"data.root={tiny_data}", "data.verify=false", "data.val_fraction=0.2",
                     "data.train_fraction=1.0", monkeypatch=monkeypatch, capsys=capsys)
    for bucket in ("train", "evaluate", "mlflow logging", "optuna storage", "artifact rendering", "mlflow model"):
        assert bucket in out


def test_workers_quick(workdir, tiny_data):
    out = bench("workers.py", f"data.root={tiny_data}", "data.verify=false", "data.val_fraction=0.2",
                "data.train_fraction=1.0", *LEAN)
    assert "1 worker(s) x" in out and "1 worker(s) by hand, sharing the cores" in out and "trials/hour" in out
    assert "without -n starts" in out


def test_orchestration_quick(workdir):
    out = bench("orchestration.py")
    assert "start-up" in out and "no-op Optuna objective" in out
    assert re.search(r"exit, last output line -> process gone .*: [0-9.]+ s; baseline, .*: [0-9.]+ s", out)
    (row,) = [line for line in out.splitlines() if line.startswith("sqlite + local")]
    assert row.rstrip().endswith("%") and float(row.split()[6]) > 0  # its trials finished and wrote their artifacts
    assert "trial 0: COMPLETE" not in out  # the studies' own lines stay out of the table


def test_model_logging_quick(workdir, monkeypatch, capsys):
    out = bench_here("model_logging", monkeypatch=monkeypatch, capsys=capsys)
    (row,) = [line for line in out.splitlines() if line.startswith("cnn ")]
    assert row.count(" ms") == 2 and "first export in a process (cnn" in out


def test_scale_quick(workdir, tmp_path):
    import os

    url = os.environ.get("FMNIST_TEST_PG_URL")
    if not url:
        pytest.skip("$FMNIST_TEST_PG_URL is not set (CI sets it): no PostgreSQL for bench/scale.py")
    out = bench("scale.py", "--pg-url", url, "--plot", str(tmp_path / "scale.png"))
    rows = [line.split() for line in out.splitlines() if line.startswith(("postgres ", "grpc ", "redis "))]
    assert {r[0] for r in rows} == {"postgres", "grpc", "redis"} and len(rows) == 3
    assert all(float(r[3]) > 0 and r[-1] == "0" for r in rows)  # trials ran, no worker refused
    assert "workers with 30 s trials served within 5% per trial" in out and (tmp_path / "scale.png").is_file()


def test_gpu_check_without_a_gpu_says_so_in_one_line(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here: bench/gpu_check.sh runs the check instead")
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), str(tmp_path / "report")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout == "no CUDA device here: the GPU check did nothing\n"
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_throughput.py"), "--quick"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout == "no CUDA device here: nothing measured\n"
    reqs = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_carry.py"), "requirements"],
                          capture_output=True, text=True, timeout=60).stdout.split()
    assert "mlflow>=3.0" in reqs and not any(r.startswith("torch") for r in reqs)  # the machine's torch stays
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for name in ("numpy-2.5.5-cp312-cp312-manylinux_2_28_x86_64.whl", "scikit_learn-1.9.1-cp312-cp312-any.whl",
                 "mlflow-3.17.2-py3-none-any.whl", "hydra_core-1.3.8-py3-none-any.whl"):
        (wheels / name).write_bytes(b"")
    subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_carry.py"), "prune", str(wheels)], check=True)
    assert sorted(p.name.split("-")[0] for p in wheels.iterdir()) == ["hydra_core", "mlflow"]  # the image has the rest


def test_sweep_efficiency_quick(workdir, tiny_data, tmp_path, monkeypatch, capsys):
    out = bench_here("sweep_efficiency", f"data.root={tiny_data}", "data.verify=false", "data.val_fraction=0.2",
                     "data.train_fraction=1.0", *LEAN, "--plot", str(tmp_path / "eff.png"), monkeypatch=monkeypatch,
                     capsys=capsys)
    for arm in ("tpe + median pruner", "tpe, no pruning", "random, no pruning"):
        assert arm in out
    assert "epochs saved by pruning, median over 1 seed(s)" in out
    assert sum("whole search:" in row for row in out.splitlines()) == 4  # one per replayed pruner
    for line in ("live: tpe + median pruner", "replay: median (quickstart's)", "replay: hyperband"):
        assert sum(line in row for row in out.splitlines()) == 2  # the seed's row and the summary's
    assert (tmp_path / "eff.png").stat().st_size > 0


def test_sweep_efficiency_replay_prunes_what_the_pruner_would():
    """The replay reports recorded curves to a real pruner: a no-op pruner gives back the
    recorded run; the median pruner stops the trial that is below every other at its second
    epoch, charging the epochs it ran."""
    import optuna

    from fmnist_sweep.sweep import Sweep

    mod = bench_module("sweep_efficiency")
    dist = {"x": optuna.distributions.FloatDistribution(0, 1)}
    curves = [[0.5, 0.6, 0.7], [0.5, 0.65, 0.75], [0.5, 0.62, 0.72], [0.4, 0.45, 0.5], [0.55, 0.7, 0.8]]
    trials = [optuna.trial.create_trial(params={"x": 0.1}, distributions=dist, value=c[-1],
                                        intermediate_values=dict(enumerate(c))) for c in curves]
    sweep = Sweep(name="t", objectives=[("val/accuracy", "maximize")], n_trials=5, space=None)
    curve, pruned = mod.replay(trials, sweep, 3, {"name": "none"})
    assert pruned == 0 and curve == [(3, 0.7), (6, 0.75), (9, 0.75), (12, 0.75), (15, 0.8)]
    curve, pruned = mod.replay(trials, sweep, 3, {"name": "median", "n_startup_trials": 3, "n_warmup_steps": 1})
    assert pruned == 1 and curve == [(3, 0.7), (6, 0.75), (9, 0.75), (11, 0.75), (14, 0.8)]
    assert mod.epochs_to_reach(curve, 0.8 - 0.002) == 14


def test_bf16_accuracy_quick(workdir, tiny_data, monkeypatch, capsys):
    out = bench_here("bf16_accuracy", f"data.root={tiny_data}", "data.verify=false", "data.val_fraction=0.2",
                     "data.train_fraction=1.0", *LEAN, monkeypatch=monkeypatch, capsys=capsys)
    assert "seed 0 fp32: val/accuracy" in out and "seed 0 bf16: val/accuracy" in out
    assert "points of val/accuracy on average over 1 seed(s)" in out


def test_recipe_quick(workdir, tiny_data):
    # (a script: its worker processes import it by name)
    out = bench("recipe.py", f"data.root={tiny_data}", "data.verify=false", "data.val_fraction=0.2",
                "data.train_fraction=1.0", *LEAN)
    rows = [line for line in out.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[0].startswith("| change | val accuracy (mean ± std, 1 seeds)")
    changes = [r.split(" | ")[0][2:] for r in rows[1:]]
    assert changes[:3] == ["no test-time augmentation", "TTA mirror", "TTA mirror + 1-px shifts"]
    assert "EMA 0.99" in changes and "bn lr x3, no decay: TTA mirror + 1-px shifts" in changes
    assert all(0 <= float(r.split(" | ")[1].split(" ± ")[0]) <= 1 for r in rows[1:])



def test_fast_paths_quick(monkeypatch, capsys):
    out = bench_here("fast_paths", "--models", "cnn,rnn", monkeypatch=monkeypatch, capsys=capsys)
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith(("cnn ", "rnn "))}
    assert set(rows) == {"cnn", "rnn"}
    assert "dropout " in rows["cnn"]
    assert "elman_rnn " in rows["rnn"] and rows["rnn"].rstrip().endswith("x")


def test_single_run_quick(workdir):
    out = bench("single_run.py")
    rows = {line[:26].strip(): line[26:].split() for line in out.splitlines()}
    for phase in ("start-up", "data + model", "epoch (with validation)", "test", "artifacts", "MLflow Model",
                  "rest of the record", "exit", "whole process"):
        assert len(rows[phase]) == 2 and all(float(v) >= 0 for v in rows[phase]), phase
    assert float(rows["MLflow Model"][0]) > 0 and float(rows["artifacts"][0]) > 0  # ours records them; the script not
    assert "ours: outside the epoch" in out and re.search(r"the whole process [0-9.]+x \([0-9.]+ of the epoch's\)", out)


def test_eval_batch_quick(tiny_data, monkeypatch, capsys):
    """One row per family, a rate per size."""
    out = bench_here("eval_batch", f"data.root={tiny_data}", "data.download=false", monkeypatch=monkeypatch,
                     capsys=capsys)
    rows = [line.split() for line in out.splitlines() if line.startswith(("cnn ", "rnn "))]
    assert [r[0] for r in rows] == ["cnn", "rnn"] and all(len(r) == 7 and r[2] == "1.00x" for r in rows)
