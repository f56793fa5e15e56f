"""The MLflow-native record: logged models that load without this package, registered
versions that serve, dataset inputs, and `predict` on pictures and IDX files."""

import gzip
import json
import os
import subprocess
import sys
import textwrap
import urllib.request

import numpy as np
import optuna
import pytest
import torch

from fmnist_sweep.cli import main
from fmnist_sweep.data import FILES, read_idx
from fmnist_sweep.models import CLASSES
from tests.helpers import REAL_DATA, free_port, idx_bytes, lr_sweep, mlflow_runs, storage, wait_http

pytestmark = pytest.mark.slow


def real_test_images(n: int):
    """The first ``n`` real test images (uint8 (n, 28, 28)) and their labels."""
    images = read_idx(REAL_DATA / FILES["test_images"][0])
    labels = read_idx(REAL_DATA / FILES["test_labels"][0])
    return np.array(images[:n]), np.array(labels[:n])


def in_process_classes(client, run_id: str, images: np.ndarray) -> np.ndarray:
    """What the run's own model (this package's layers, its weights file) predicts."""
    from omegaconf import OmegaConf

    from fmnist_sweep.train import build

    cfg = OmegaConf.load(client.download_artifacts(run_id, "config.yaml"))
    b = build(cfg)
    b.model.load_state_dict(torch.load(client.download_artifacts(run_id, "weights/state_dict.pt")))
    b.model.eval()
    with torch.no_grad():
        return b.model(torch.from_numpy(images).float().div(255).unsqueeze(1))[0].argmax(1).numpy()


def test_finalize_registers_a_model_that_loads_without_the_package_and_serves(tiny_overrides, workdir, tmp_path,
                                                                              capsys):
    assert main([f"sweep={lr_sweep(tmp_path, 3)}", *tiny_overrides]) == 0
    capsys.readouterr()
    assert main(["finalize", "mine", "--top-k", "2", "--seeds", "2", "trainer.epochs=2"]) == 0
    out = capsys.readouterr().out
    assert "| trial | val (val/accuracy) | test/accuracy mean ± std |" in out
    assert "Registered: `models:/fmnist-mine/1`" in out
    client, runs = mlflow_runs(workdir, "mine")
    finals = [r for r in runs if r.data.tags.get("fmnist.role") == "final"]
    assert len(finals) == 4 and all(r.outputs.model_outputs for r in finals)
    for r in finals:  # retrained on train+val, tested once
        assert r.data.params["data.val_fraction"] == "0" and r.data.params["trainer.epochs"] == "2"
        assert "val/accuracy" not in r.data.metrics and "test/accuracy" in r.data.metrics
    best = optuna.load_study(study_name="mine", storage=storage(workdir)).best_trial
    assert {r.data.tags["fmnist.final_of_trial"] for r in finals} >= {str(best.number)}
    assert "final/accuracy_mean" in next(r for r in runs if r.data.tags.get("fmnist.role") == "study").data.metrics
    (version,) = client.search_model_versions("name='fmnist-mine'")
    assert version.run_id in {r.info.run_id for r in finals}
    assert version.source.startswith("models:/m-") and version.tags["optuna.study"] == "mine"
    assert {"trial", "test_mean", "test_std"} <= set(version.tags)
    images, _ = real_test_images(16)
    expected = in_process_classes(client, version.run_id, images)
    np.save(tmp_path / "images.npy", images)

    # A fresh interpreter that never imports fmnist_sweep.
    script = textwrap.dedent(f"""
        import sys, mlflow, numpy as np
        mlflow.set_tracking_uri("sqlite:///{workdir / 'mlruns.db'}")
        probs = mlflow.pyfunc.load_model("models:/fmnist-mine/1").predict(np.load("{tmp_path / 'images.npy'}"))
        assert not any(m.startswith("fmnist_sweep") for m in sys.modules)
        print(probs.argmax(1).tolist())
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180,
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": ""})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == expected.tolist()

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/fmnist-mine/1",
                               "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
                              env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlruns.db'}",
                                   # the server runs `uvicorn` from PATH: this interpreter's, as in its venv
                                   "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", server, what="mlflow models serve")
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", method="POST",
                                         data=json.dumps({"inputs": images.tolist()}).encode(),
                                         headers={"Content-Type": "application/json"})
        answer = json.load(urllib.request.urlopen(request, timeout=60))
    finally:
        server.terminate()
        server.wait(30)
    probs = np.array(answer["predictions"])
    assert probs.shape == (16, 10) and np.allclose(probs.sum(1), 1, atol=1e-4)
    assert probs.argmax(1).tolist() == expected.tolist()


def test_runs_record_their_datasets_and_predict_reads_pictures_and_idx(tiny_overrides, workdir, tmp_path, capsys):
    from PIL import Image

    assert main([*tiny_overrides, "trainer.test=true", "tracking.log_models=best"]) == 0
    assert main([*tiny_overrides, "data.split_seed=1", "trainer.test=false"]) == 0  # (log_models=none)
    printed = capsys.readouterr().out
    assert printed.count("model: models:/m-") == 1 and "/#/experiments/" in printed
    client, (first, second) = mlflow_runs(workdir)
    inputs = {r.info.run_id: {d.tags[0].value: d.dataset for d in r.inputs.dataset_inputs} for r in (first, second)}
    one, other = inputs[first.info.run_id], inputs[second.info.run_id]
    assert sorted(one) == ["test", "training", "validation"] and sorted(other) == ["training", "validation"]
    assert one["training"].name == "fashion-mnist-training" and json.loads(one["test"].profile)["num_rows"] == 60
    assert one["validation"].digest != other["validation"].digest  # another split seed, another split
    (model,) = first.outputs.model_outputs
    assert client.get_logged_model(model.model_id).status.name == "READY"
    assert not second.outputs.model_outputs and "weights/state_dict.pt" in [  # no Model; its weights kept
        f.path for f in client.list_artifacts(second.info.run_id, "weights")]

    images, labels = real_test_images(200)
    folder = tmp_path / "pictures"
    folder.mkdir()
    for c in range(10):  # one real test image per class, as a PNG
        Image.fromarray(images[np.flatnonzero(labels == c)[0]]).save(folder / f"class{c}.png")
    assert main(["predict", f"runs:/{first.info.run_id}", str(folder)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == [f"class{c}.png" for c in range(10)]
    for line in lines:
        name, *cls, p = line.split()
        assert " ".join(cls) in CLASSES and 0.1 <= float(p) <= 1.0  # the likeliest of ten classes

    idx = tmp_path / "five.idx"
    idx.write_bytes(idx_bytes(images[:5]))
    assert main(["predict", f"runs:/{first.info.run_id}", str(idx)]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == [f"five.idx[{i}]" for i in range(5)]
    idx.with_suffix(".gz").write_bytes(gzip.compress(idx_bytes(images[:5]))[:-20])

    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    for bad in (folder / "broken.png", idx.with_suffix(".gz")):
        assert main(["predict", f"runs:/{first.info.run_id}", str(bad)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"error: {bad}")
