"""The GPU path, on a real CUDA device (skipped without one; `bench/gpu_check.sh` runs these):
every family trains there, bf16 where the device has it, one GPU packed with a study's
workers, and a worker's out-of-memory trial fails alone with a clear message."""

import os
import subprocess
import sys

import pytest
import torch

from fmnist_sweep.cli import main
from fmnist_sweep.config import compose
from fmnist_sweep.record import run
from tests.helpers import lr_sweep, mlflow_runs, trials

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="no CUDA device here (bench/gpu_check.sh on a GPU machine)")]
FAMILIES = ("cnn", "resnet", "rnn", "bilstm", "autoencoder", "encoder_classifier")


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_trains_on_the_gpu(family, tiny_overrides, workdir):
    assert main([*tiny_overrides, f"model={family}", "trainer.device=cuda", "trainer.epochs=2",
                 "tracking.log_models=best"]) == 0
    _, (r,) = mlflow_runs(workdir)
    assert r.info.status == "FINISHED" and r.data.tags["fmnist.device"] == "cuda"
    assert r.data.tags["fmnist.cpu_fast_paths"] == "False" and r.outputs.model_outputs
    from hydra.utils import instantiate

    gains = getattr(instantiate(compose([f"model={family}"]).model), "bf16_gain", False)
    # precision=auto: bf16 where the device has it, for the families that gain from it
    assert r.data.tags["fmnist.precision"] == ("bf16" if gains and torch.cuda.is_bf16_supported() else "fp32")


def test_cuda_graphs_train_the_residual_cnn(tiny_overrides, workdir):
    assert main([*tiny_overrides, "model=resnet", "trainer.device=cuda", "trainer.epochs=2",
                 "trainer.compile=reduce-overhead", "tracking.log_models=best"]) == 0
    _, (r,) = mlflow_runs(workdir)
    assert r.info.status == "FINISHED" and r.data.params["trainer.compile"] == "reduce-overhead"
    assert r.outputs.model_outputs


def test_a_study_packs_four_workers_on_one_gpu(tiny_overrides, workdir, tmp_path):
    sweep = lr_sweep(tmp_path, 6)
    proc = subprocess.run([sys.executable, "-m", "fmnist_sweep", "workers", "-n", "4", "--per-gpu", "4",
                           f"sweep={sweep}", *tiny_overrides, "trainer.device=cuda", "trainer.epochs=2"],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "CUDA_VISIBLE_DEVICES": "0"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    done = [t for t in trials(workdir, "mine") if t.state.name == "COMPLETE"]
    assert len(done) >= 6 and all(t.user_attrs["device"].startswith("cuda:0") for t in done)
    assert len({t.user_attrs["worker"] for t in done}) > 1  # several workers shared the GPU


def test_an_out_of_memory_trial_fails_alone_with_a_clear_message(tiny_overrides, workdir):
    cfg = compose([*tiny_overrides, "trainer.device=cuda", "model=bilstm", "trainer.batch_size=160"])
    cfg.trainer.progress = False
    torch.cuda.set_per_process_memory_fraction(1e-6)  # this process may hold next to nothing
    try:
        result = run(cfg, ["model=bilstm"])
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert result.status == "FAILED"
    assert result.message.startswith("out of device memory at trainer.batch_size=160")
    assert run(compose([*tiny_overrides, "trainer.device=cuda"]), []).status == "FINISHED"  # and the next one runs
