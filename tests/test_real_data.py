"""Integration on a 2k-image slice of the real Fashion-MNIST (installed by .ci/run)."""

import subprocess
import sys

import pytest

from fmnist_sweep.data import FILES
from tests.helpers import REAL_DATA, mlflow_runs

pytestmark = pytest.mark.slow

# SHA-256 over the four decoded arrays of the official files.
OFFICIAL_DATA_SHA256 = "ca3ab2a37f84"


@pytest.fixture
def real_data():
    missing = [n for n, _ in FILES.values() if not (REAL_DATA / n).is_file()]
    assert not missing, (f"real Fashion-MNIST missing in {REAL_DATA}: apt-get install dataset-fashion-mnist "
                         "(or set FMNIST_REAL_DATA)")
    return REAL_DATA


def test_one_epoch_on_a_real_slice_through_the_cli(real_data, workdir):
    args = [f"data.root={real_data}", "data.train_fraction=0.037", "data.val_fraction=0.02",
            "data.test_fraction=0.1", "trainer.epochs=1"]
    proc = subprocess.run([sys.executable, "-m", "fmnist_sweep", *args], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "epoch 1/1" in proc.stdout and "test/accuracy" in proc.stdout
    client, (r,) = mlflow_runs(workdir)
    assert r.info.status == "FINISHED"
    assert r.data.tags["data.sha256"].startswith(OFFICIAL_DATA_SHA256)
    assert r.data.params["model.n_params"] == "305978"
    # 1,998 training images, one epoch of the seed CNN: far above chance (10%).
    assert r.data.metrics["val/accuracy"] > 0.45
    assert r.data.metrics["test/accuracy"] > 0.45
    assert len(client.get_metric_history(r.info.run_id, "test/accuracy")) == 1  # touched once, at the end
    names = {f.path for f in client.list_artifacts(r.info.run_id)}
    assert {"confusion_matrix_test.png", "classification_report_test.csv", "weights"} <= names
    assert r.outputs.model_outputs  # a single run logs its MLflow Model
