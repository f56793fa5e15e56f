"""Tools a user already knows work on the studies we write: the `optuna` CLI and
optuna-dashboard; and the errors a newcomer can cause end in one helpful line."""

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from fmnist_sweep.cli import main
from tests.helpers import TINY, enter_workdir, free_port, lr_sweep, wait_http, write_idx

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def study_work(tmp_path_factory, migrated_mlflow_db) -> Path:
    """A work dir holding a finished 3-trial study "tools", made once for this module's read-only checks."""
    import shutil

    root = tmp_path_factory.mktemp("tools")
    write_idx(root / "data")
    shutil.copyfile(migrated_mlflow_db, root / "mlruns.db")
    with pytest.MonkeyPatch.context() as mp:
        enter_workdir(mp, root, root / "cache")
        assert main([f"sweep={lr_sweep(root, 3, 'tools')}", *TINY, f"data.root={root / 'data'}"]) == 0
    return root


@pytest.fixture
def study_store(study_work) -> str:
    return f"sqlite:///{study_work / 'studies.db'}"


def test_optuna_cli_reads_our_study(study_store):
    out = subprocess.run([str(BIN / "optuna"), "trials", "--study-name", "tools", "--storage", study_store,
                          "-f", "json"], capture_output=True, text=True, check=True).stdout
    trials = json.loads(out)
    assert len(trials) == 3 and all(t["state"] == "COMPLETE" for t in trials)
    assert "optimizer.lr" in trials[0]["params"] and trials[0]["user_attrs"]["mlflow_run_id"]
    names = subprocess.run([str(BIN / "optuna"), "study-names", "--storage", study_store],
                           capture_output=True, text=True, check=True).stdout
    assert "tools" in names


def test_optuna_dashboard_serves_our_study(study_store):
    port = free_port()
    proc = subprocess.Popen([str(BIN / "optuna-dashboard"), study_store, "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{port}/api/studies", proc, 60, "optuna-dashboard")
        studies = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5))
        (study,) = [s for s in studies["study_summaries"] if s["study_name"] == "tools"]
        detail = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies/{study['study_id']}"))
        assert len(detail["trials"]) == 3 and detail["trials"][0]["state"] == "Complete"
    finally:
        proc.terminate()
        proc.wait(10)


def test_unreachable_mlflow_server_is_one_clear_error(tiny_overrides, workdir, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    assert main(["tracking=server", *tiny_overrides]) == 2
    err = capsys.readouterr().err
    assert err == ("error: MLflow tracking server http://127.0.0.1:9 is unreachable (connection refused). "
                   "Fix: start it, or point $MLFLOW_TRACKING_URI at it; tracking=local needs no server.\n")


def test_report_of_a_missing_study_names_what_is_there(study_work, monkeypatch, capsys):
    monkeypatch.chdir(study_work)
    assert main(["report", "tool"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no study 'tool' in ") and "Studies there: tools." in err and "Did you mean tools?" in err
