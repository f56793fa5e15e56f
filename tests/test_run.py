"""One training run through the CLI, checked in the MLflow store it writes."""

import shlex
from contextlib import nullcontext

import pytest
import torch
from hydra.utils import instantiate

from fmnist_sweep.cli import main
from fmnist_sweep.config import compose
from fmnist_sweep import data as fmnist
from fmnist_sweep.record import run
from fmnist_sweep.train import evaluate, tta_views
from tests.helpers import RECORD, mlflow_runs


def artifact_paths(client, run_id, path=None):
    out = []
    for f in client.list_artifacts(run_id, path):
        out += artifact_paths(client, run_id, f.path) if f.is_dir else [f.path]
    return out


def test_run_is_recorded_with_params_metrics_tags_artifacts(tiny_overrides, workdir, capsys):
    overrides = tiny_overrides + ["trainer.epochs=2", "optimizer.lr=0.002", *RECORD]
    assert main(overrides) == 0
    out = capsys.readouterr().out
    assert "epoch 1/2" in out and "epoch 2/2" in out and "img/s" in out
    assert "FINISHED" in out and "mlflow ui --backend-store-uri sqlite:///" in out

    client, runs = mlflow_runs(workdir)
    assert len(runs) == 1
    r = runs[0]
    assert r.info.status == "FINISHED"
    assert r.data.params["optimizer.lr"] == "0.002"
    assert r.data.params["model._target_"] == "fmnist_sweep.models.cnn.CNN"
    assert r.data.params["trainer.epochs"] == "2"
    assert r.data.tags["fmnist.overrides"] == shlex.join(overrides)
    assert r.data.tags["fmnist.command"].startswith("python -m fmnist_sweep data.root=")
    assert len(r.data.tags["data.sha256"]) == 64
    assert r.data.tags["mlflow.source.git.commit"]
    for key in ("train/loss", "val/loss", "val/accuracy", "lr", "perf/images_per_s", "perf/epoch_seconds"):
        history = client.get_metric_history(r.info.run_id, key)
        assert [m.step for m in history] == [1, 2], key
    assert 0 <= r.data.metrics["test/accuracy"] <= 1
    assert "test/loss" in r.data.metrics

    files = artifact_paths(client, r.info.run_id)
    for name in ("config.yaml", "weights/state_dict.pt", "learning_curves.png", "confusion_matrix_test.png",
                 "classification_report_test.csv", "classification_report_test.txt"):
        assert name in files
    local = client.download_artifacts(r.info.run_id, "")
    header, *rows = open(f"{local}/classification_report_test.csv").read().splitlines()
    assert header == "class,precision,recall,f1-score,support"
    assert rows[6].startswith("Shirt,") and len(rows) == 12
    state = torch.load(f"{local}/weights/state_dict.pt", weights_only=True)
    model = instantiate(compose(overrides).model)
    model.load_state_dict(state)
    assert open(f"{local}/config.yaml").read().startswith("data:")


def test_same_config_and_seed_give_same_metrics_and_override_line_reruns(tiny_overrides, workdir):
    assert main(tiny_overrides + ["trainer.epochs=2"]) == 0
    client, (first,) = mlflow_runs(workdir)
    assert main(shlex.split(first.data.tags["fmnist.overrides"])) == 0
    _, runs = mlflow_runs(workdir)
    a, b = (client.get_metric_history(r.info.run_id, "val/loss") for r in runs)
    assert [m.value for m in a] == [m.value for m in b]
    assert runs[0].data.metrics["test/accuracy"] == runs[1].data.metrics["test/accuracy"]
    assert main(tiny_overrides + ["trainer.epochs=2", "seed=1"]) == 0
    _, runs = mlflow_runs(workdir)
    c = client.get_metric_history(runs[2].info.run_id, "val/loss")
    assert [m.value for m in c] != [m.value for m in a]


def test_weight_ema_is_the_model_that_is_evaluated_and_saved(tiny_overrides, workdir, capsys):
    over = tiny_overrides + ["trainer.epochs=3", "trainer.precision=fp32", "trainer.channels_last=false"]
    assert main([*over, "trainer.ema=0.9"]) == 0 and main(over) == 0
    client, (ema, plain) = mlflow_runs(workdir)
    assert ema.data.params["trainer.ema"] == "0.9" and plain.data.params["trainer.ema"] == "None"
    weights = [torch.load(f"{client.download_artifacts(r.info.run_id, '')}/weights/state_dict.pt", weights_only=True)
               for r in (ema, plain)]
    assert any(not torch.equal(a, b) for a, b in zip(weights[0].values(), weights[1].values()))
    # The saved model scores on the validation split what the run logged for its last epoch.
    cfg = compose([*over, "trainer.ema=0.9"])
    model = instantiate(cfg.model)
    model.load_state_dict(weights[0])
    split = fmnist.load(cfg.data).val
    val = evaluate(model, split, 1000, nullcontext, False)
    assert val["accuracy"] == pytest.approx(ema.data.metrics["val/accuracy"], abs=1.5 / len(split))
    assert main([*over, "trainer.ema=1.5"]) == 2
    assert "trainer.ema" in capsys.readouterr().err


def test_compiled_training_steps_train_the_model_that_is_saved(tiny_overrides, workdir, capsys):
    # No dropout: compiled code draws its random masks from another generator than eager. One
    # block (fewer kernels to generate and build) and one epoch: the fused kernels' rounding is
    # then all that differs, before training steps compound it. Batches of 40 split the 80
    # training images evenly: one batch shape, one compilation.
    over = tiny_overrides + ["trainer.precision=fp32", "trainer.channels_last=false", "model.widths=[8]",
                             "model.dropouts=0.0", "model.dense_dropout=0.0", "trainer.batch_size=40"]
    assert main([*over, "trainer.compile=default", "tracking.log_models=best"]) == 0 and main(over) == 0
    client, (compiled, eager) = mlflow_runs(workdir)
    assert compiled.info.status == "FINISHED" and compiled.data.params["trainer.compile"] == "default"
    # Same seed, data and batches: torch.compile's fused kernels round differently, nothing more.
    for key in ("train/loss", "val/loss"):
        assert compiled.data.metrics[key] == pytest.approx(eager.data.metrics[key], rel=0.02)
    assert compiled.outputs.model_outputs  # the MLflow Model is the plain module's export
    assert main([*over, "trainer.compile=fast"]) == 2
    assert "trainer.compile" in capsys.readouterr().err


def test_test_shift_averages_shifted_views_at_the_test_evaluation_only(tiny_overrides, workdir, capsys):
    x = torch.arange(2 * 28 * 28, dtype=torch.float32).view(2, 1, 28, 28)
    views = tta_views(x, flip=True, shift=1)
    assert len(views) == 10 and all(v.shape == x.shape for v in views)
    assert torch.equal(views[2][..., 1:], x[..., :-1]) and (views[2][..., 0] == 0).all()  # moved right
    assert torch.equal(views[5][..., :-1, :], x[..., 1:, :])  # moved up
    over = tiny_overrides + ["trainer.epochs=2", "trainer.eval_flip=true"]
    assert main(over) == 0 and main([*over, "trainer.test_shift=1"]) == 0
    client, (plain, shifted) = mlflow_runs(workdir)
    history = [[m.value for m in client.get_metric_history(r.info.run_id, "val/accuracy")] for r in (plain, shifted)]
    assert history[0] == history[1]  # validation during training is unchanged
    assert plain.data.metrics["test/loss"] != shifted.data.metrics["test/loss"]
    assert main([*over, "trainer.test_shift=9"]) == 2
    assert "trainer.test_shift" in capsys.readouterr().err


def test_autoencoder_run_and_pretrained_frozen_encoder_from_its_run_id(tiny_overrides, workdir):
    assert main(tiny_overrides + ["model=autoencoder", "model.latent_dim=8", "optimizer=adam", *RECORD]) == 0
    client, (ae,) = mlflow_runs(workdir)
    assert "val/accuracy" not in ae.data.metrics and "val/loss" in ae.data.metrics
    assert "reconstructions_test.png" in artifact_paths(client, ae.info.run_id)
    assert ae.data.tags["fmnist.task"] == "reconstruct"

    assert main(tiny_overrides + ["model=encoder_classifier", "model.latent_dim=8", "optimizer=adam",
                                  f"model.pretrained={ae.info.run_id}", "model.freeze=true"]) == 0
    _, runs = mlflow_runs(workdir)
    clf = runs[1]
    assert clf.data.metrics["val/accuracy"] >= 0
    ae_state = torch.load(client.download_artifacts(ae.info.run_id, "weights/state_dict.pt"), weights_only=True)
    clf_state = torch.load(client.download_artifacts(clf.info.run_id, "weights/state_dict.pt"), weights_only=True)
    enc = [k for k in ae_state if k.startswith("encoder.")]
    assert enc and all(torch.equal(ae_state[k], clf_state[k]) for k in enc)  # frozen: unchanged


def test_missing_pretrained_checkpoint_is_a_clear_error(tiny_overrides, capsys):
    code = main(tiny_overrides + ["model=encoder_classifier", "model.pretrained=/no/such.pt"])
    err = capsys.readouterr().err
    assert code == 2 and "model.pretrained=/no/such.pt: no such file" in err


def test_diverging_run_is_failed_with_a_message_not_a_crash(tiny_overrides, workdir, capsys):
    code = main(tiny_overrides + ["model=rnn", "optimizer=sgd", "optimizer.lr=1e8"])
    err = capsys.readouterr().err
    assert code == 1
    assert "diverged" in err and "optimizer.lr" in err and "Traceback" not in err
    _, (r,) = mlflow_runs(workdir)
    assert r.info.status == "FAILED" and "loss became" in r.data.tags["fmnist.failure"]


def test_early_stopping_stops_when_the_monitor_stalls(tiny_overrides, workdir):
    assert main(tiny_overrides + ["trainer.epochs=6", "trainer.early_stopping_patience=1",
                                  "optimizer.lr=1e-30"]) == 0
    client, (r,) = mlflow_runs(workdir)
    assert len(client.get_metric_history(r.info.run_id, "val/accuracy")) == 2


def test_report_hook_prunes_and_run_is_killed(tiny_overrides, workdir):
    seen = []
    result = run(compose(tiny_overrides + ["trainer.epochs=3"]),
                 report=lambda epoch, metrics: seen.append((epoch, metrics)) or epoch == 2)
    assert result.status == "KILLED" and [e for e, _ in seen] == [1, 2]
    assert seen[1][1]["val/accuracy"] == result.metrics["val/accuracy"]
    client, (r,) = mlflow_runs(workdir)
    assert r.info.status == "KILLED" and r.data.tags["fmnist.pruned"] == "true"
    assert len(client.get_metric_history(r.info.run_id, "val/accuracy")) == 2


def test_a_prune_signal_at_the_last_epoch_keeps_the_finished_result(tiny_overrides, workdir):
    """Pruning after the last epoch would save nothing and throw a paid-for result away."""
    seen = []
    result = run(compose(tiny_overrides + ["trainer.epochs=2"]),
                 report=lambda epoch, metrics: seen.append(epoch) or epoch == 2)
    assert result.status == "FINISHED" and seen == [1, 2] and result.metrics["val/accuracy"] >= 0
    client, (r,) = mlflow_runs(workdir)
    assert r.info.status == "FINISHED" and "fmnist.pruned" not in r.data.tags
    assert len(client.get_metric_history(r.info.run_id, "val/accuracy")) == 2


def test_cuda_request_falls_back_to_cpu_with_a_warning(tiny_overrides, workdir, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the fallback path is for machines without it")
    assert main(tiny_overrides + ["trainer.device=cuda", "trainer.precision=fp32"]) == 0
    assert "CUDA is not available here; training on cpu" in capsys.readouterr().out
    _, (r,) = mlflow_runs(workdir)
    assert r.data.tags["fmnist.device"] == "cpu" and r.data.tags["fmnist.precision"] == "fp32"


@pytest.mark.parametrize("vendor, flags, why", [
    ("AuthenticAMD", "fpu avx2", "a CPU where bf16 trains slower than fp32 (flags: no bf16 instructions"),
    ("GenuineIntel", "fpu avx512f avx512_bf16", "a CPU where bf16 trains slower than fp32 (flags: avx512_bf16 "
                                                "without amx_bf16)")])
def test_bf16_where_it_is_not_fast_warns_and_auto_stays_fp32(tiny_overrides, workdir, capsys, monkeypatch, tmp_path,
                                                              vendor, flags, why):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nvendor_id\t: {vendor}\ncpu family\t: 6\nflags\t\t: {flags}\n")
    monkeypatch.setattr("fmnist_sweep.hardware.CPUINFO", str(cpuinfo))
    assert main(tiny_overrides) == 0
    assert "warning" not in capsys.readouterr().out
    assert main(tiny_overrides + ["trainer.precision=bf16"]) == 0
    assert f"warning: trainer.precision=bf16 on {why}" in capsys.readouterr().out
    _, runs = mlflow_runs(workdir)
    assert sorted(r.data.tags["fmnist.precision"] for r in runs) == ["bf16", "fp32"]


@pytest.mark.parametrize("vendor, flags, fast", [
    ("GenuineIntel", "fpu avx512_bf16 amx_bf16 amx_tile", True),   # AMX tiles shown
    ("GenuineIntel", "fpu avx512_bf16", False),                    # no AMX tiles shown (or a VM hiding them)
    ("AuthenticAMD", "fpu avx512_bf16", True),
    ("AuthenticAMD", "fpu avx2", False), ("GenuineIntel", "fpu avx2", False)])
def test_precision_auto_uses_bf16_only_where_the_cpu_makes_it_fast(tmp_path, monkeypatch, vendor, flags, fast):
    from fmnist_sweep.hardware import select_precision

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nvendor_id\t: {vendor}\nflags\t\t: {flags}\n")
    monkeypatch.setattr("fmnist_sweep.hardware.CPUINFO", str(cpuinfo))
    cnn = instantiate(compose(["model=cnn"]).model)
    assert select_precision("auto", torch.device("cpu"), cnn) == ("bf16" if fast else "fp32")


@pytest.mark.parametrize("env, fast", [
    ({"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}, False),  # AVX2 code paths forced
    ({"ATEN_CPU_CAPABILITY": "default"}, False), ({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}, False),
    ({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX"}, True), ({"ONEDNN_MAX_CPU_ISA": "ALL"}, True)])
def test_an_instruction_set_cap_below_bf16_keeps_auto_in_fp32(tmp_path, monkeypatch, env, fast, capsys):
    """On a CPU whose bf16 is fast, kernels capped below its bf16 instructions emulate bf16:
    precision auto stays fp32, and an explicit bf16 says why."""
    from fmnist_sweep.hardware import select_precision

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu avx512_bf16 amx_bf16 amx_tile\n")
    monkeypatch.setattr("fmnist_sweep.hardware.CPUINFO", str(cpuinfo))
    for name in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    cnn = instantiate(compose(["model=cnn"]).model)
    assert select_precision("auto", torch.device("cpu"), cnn) == ("bf16" if fast else "fp32")
    select_precision("bf16", torch.device("cpu"), cnn)
    out = capsys.readouterr().out
    assert ("leaves out (autocast emulates them)" in out) != fast, out


def test_training_keeps_freed_memory_in_the_process(tiny_overrides, workdir, monkeypatch):
    """run() sets the allocator to keep freed memory; with it, a freed-and-reallocated 8 MB
    activation-sized block comes from the heap instead of a fresh mmap page-faulted in at
    every step (glibc's mallinfo2, in fresh processes: this one's heap holds other tests'
    free blocks)."""
    import subprocess
    import sys

    if not sys.platform.startswith("linux"):
        pytest.skip("glibc's allocator only")
    calls = []
    monkeypatch.setattr("fmnist_sweep.hardware.keep_freed_memory", lambda keep=True: calls.append(keep))
    assert main(tiny_overrides) == 0 and calls == [True]
    probe = """
import ctypes, sys, torch
from fmnist_sweep.hardware import keep_freed_memory
class MallInfo2(ctypes.Structure):
    _fields_ = [(f, ctypes.c_size_t) for f in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "keep":
    assert keep_freed_memory()
before = libc.mallinfo2().hblkhd
block = torch.empty(2 << 20)  # 8 MB
print(libc.mallinfo2().hblkhd - before)
"""
    mmapped = {how: int(subprocess.run([sys.executable, "-c", probe, how], capture_output=True, text=True,
                                       check=True).stdout) for how in ("system", "keep")}
    assert mmapped["system"] >= 8 << 20 and mmapped["keep"] == 0


@pytest.mark.parametrize("release,on", [(None, True), ("2.99.0+cpu", False)])
def test_cpu_fast_paths_run_on_tested_torch_releases_and_fall_back_elsewhere(release, on, tiny_overrides,
                                                                            workdir, monkeypatch):
    """On the torch release CI tests, the private-operator layer (the SimpleRNN's recurrence)
    trains; on any other release a whole run takes torch's own
    layers (the recurrence is never entered) and still finishes; the run's record says which."""
    from fmnist_sweep.models import fast
    from fmnist_sweep.models.fast import elman

    if release is not None:
        monkeypatch.setattr(fast, "TORCH_VERSION", release)
        monkeypatch.setattr(elman._Elman, "apply", lambda *a: pytest.fail("fast recurrence on an untested torch"))
    assert fast.private_ops_allowed() == on
    for model in ("cnn", "rnn"):
        result = run(compose([*tiny_overrides, f"model={model}"]))
        assert result.status == "FINISHED" and 0 <= result.metrics["val/accuracy"] <= 1
    _, runs = mlflow_runs(workdir)
    assert {r.data.tags["fmnist.cpu_fast_paths"] for r in runs} == {str(on)}
