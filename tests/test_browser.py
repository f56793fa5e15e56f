"""The MLflow UI in a real (headless) Chromium, over the store a tiny study wrote."""

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from fmnist_sweep.cli import main
from tests.helpers import RECORD, free_port, wait_http

ROOT = Path(__file__).resolve().parents[1]
# Where the screenshot goes: a CI artifact folder (git-ignored).
SHOTS = Path(os.environ.get("FMNIST_SCREENSHOT_DIR", ROOT / ".ci" / "artifacts"))
pytestmark = pytest.mark.slow


def chrome(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and driver, "install Debian's chromium and chromium-driver (.ci/run does)"
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--no-first-run", "--window-size=1500,900", f"--user-data-dir={tmp_path / 'chrome'}"):
        opts.add_argument(a)
    return webdriver.Chrome(service=Service(driver), options=opts)


def wait_for(driver, text, seconds=60):
    from selenium.webdriver.common.by import By

    deadline = time.time() + seconds
    while time.time() < deadline:
        body = driver.find_element(By.TAG_NAME, "body").text
        if text in body:
            return body
        time.sleep(0.5)
    raise AssertionError(f"{text!r} never appeared; the page shows: {body[:500]}")


@pytest.fixture
def mlflow_ui(tiny_overrides, workdir, tmp_path, capsys):
    """A 4-trial study, then `mlflow ui` as the README says, on a free loopback port; the UI's
    address and the page of the `browse:` link the study printed."""
    sweep = tmp_path / "browse.yaml"
    sweep.write_text("objective: val/accuracy\nn_trials: 4\nsampler: {name: random, seed: 0}\n"
                     "params:\n  optimizer.lr: tag(log, interval(1e-4, 1e-2))\n")
    assert main([f"sweep={sweep}", *tiny_overrides, "trainer.epochs=4", "trainer.test=true", *RECORD]) == 0
    link = capsys.readouterr().out.split("then open http://127.0.0.1:5000/", 1)[1].split()[0]
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", "sqlite:///mlruns.db",
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"], cwd=workdir,
                            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/health", proc, what="mlflow ui")
    yield url, link
    proc.terminate()
    proc.wait(30)


def printed_link_ranks_trials_with_their_datasets_and_models(driver, url, link, experiment_id):
    """The study's `browse:` link: its trials (not the parent), best first, each with its
    datasets; those that logged a model (the best so far when each ended) show it. The
    best trial's page lists its datasets and links its metrics to its model."""
    runs = json.load(urllib.request.urlopen(urllib.request.Request(
        f"{url}/ajax-api/2.0/mlflow/runs/search", method="POST", headers={"Content-Type": "application/json"},
        data=json.dumps({"experiment_ids": [experiment_id], "filter": "tags.`optuna.study` = 'browse'"}).encode())))
    accuracy = {r["info"]["run_name"]: next(m["value"] for m in r["data"]["metrics"] if m["key"] == "val/accuracy")
                for r in runs["runs"] if r["info"]["run_name"].startswith("trial")}
    with_model = [r for r in runs["runs"] if r.get("outputs", {}).get("model_outputs")]
    from selenium.webdriver.common.by import By

    driver.get(f"{url}/{link}")
    wait_for(driver, "4 matching runs")
    for close in driver.find_elements(By.CSS_SELECTOR, "button[aria-label=Close]"):
        driver.execute_script("arguments[0].click()", close)  # the assistant side panel
    body = wait_for(driver, "4 matching runs")
    lines = body.splitlines()
    assert "study browse" not in lines and "Dataset" in lines and "Models" in lines
    names = [line for line in lines if line.startswith("trial ")]
    assert sorted(names) == sorted(accuracy)
    assert [accuracy[n] for n in names] == sorted(accuracy.values(), reverse=True)  # ranked by the objective
    assert body.count("fashion-mnist-training") == 4 and "model" in body.split("Models", 1)[1]
    time.sleep(1)
    SHOTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(SHOTS / "mlflow-ui-trials.png"))
    assert with_model  # the first trial is the best so far when it ends
    driver.get(f"{url}/#/experiments/{experiment_id}/runs/{with_model[0]['info']['run_id']}")
    body = wait_for(driver, "fashion-mnist-training")
    assert "Models" in body.splitlines() and "\nmodel\n" in body  # its metrics link to its model
    driver.save_screenshot(str(SHOTS / "mlflow-ui-trial-page.png"))


def test_study_parent_and_trials_are_listed_and_artifacts_reachable(mlflow_ui, tmp_path):
    from selenium.webdriver.common.by import By

    mlflow_ui, link = mlflow_ui
    exps = json.load(urllib.request.urlopen(f"{mlflow_ui}/ajax-api/2.0/mlflow/experiments/search?max_results=50"))
    exp = next(e for e in exps["experiments"] if e["name"] == "browse")
    driver = chrome(tmp_path)
    try:
        driver.get(f"{mlflow_ui}/#/experiments/{exp['experiment_id']}/runs")
        wait_for(driver, "study browse")
        for close in driver.find_elements(By.CSS_SELECTOR, "button[aria-label=Close]"):
            close.click()  # the assistant side panel
        for mode in driver.find_elements(By.XPATH, "//button[normalize-space()='Model training']"):
            driver.execute_script("arguments[0].click()", mode)  # the UI's classic (non-GenAI) view
        wait_for(driver, "study browse")
        for _ in range(5):  # expand the parent run to list its trials
            toggle = driver.find_element(By.CSS_SELECTOR, "button[data-component-id*='runnamecellrenderer']")
            driver.execute_script("arguments[0].click()", toggle)
            try:
                body = wait_for(driver, "trial 2", seconds=6)
                break
            except AssertionError:
                continue
        assert "trial 0" in body and "trial 1" in body and "trial 2" in body
        SHOTS.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(SHOTS / "mlflow-ui-study.png"))
        # The chart view: every trial's validation curve side by side (the README's picture).
        driver.execute_script("arguments[0].click()", driver.find_element(By.CSS_SELECTOR, "input[value=CHART]"))
        search = driver.find_element(By.CSS_SELECTOR, "input[placeholder*='Search metric charts']")
        search.send_keys("val/accuracy")
        wait_for(driver, "val/accuracy")
        for header in driver.find_elements(By.XPATH, "//*[starts-with(normalize-space(text()), 'best/val')]"):
            driver.execute_script("arguments[0].click()", header)  # fold the best-value group: curves first
        time.sleep(3)  # let the charts draw
        driver.save_screenshot(str(SHOTS / "mlflow-ui-trials-chart.png"))

        # A trial's page, and its confusion matrix served to the browser.
        runs = json.load(urllib.request.urlopen(urllib.request.Request(
            f"{mlflow_ui}/ajax-api/2.0/mlflow/runs/search", method="POST",
            data=json.dumps({"experiment_ids": [exp["experiment_id"]],
                             "filter": "tags.`optuna.trial_number` = '0'"}).encode(),
            headers={"Content-Type": "application/json"})))["runs"]
        run_id = runs[0]["info"]["run_id"]
        driver.get(f"{mlflow_ui}/#/experiments/{exp['experiment_id']}/runs/{run_id}/artifacts")
        wait_for(driver, "confusion_matrix_test.png")
        driver.find_element(By.XPATH, "//*[text()='confusion_matrix_test.png']").click()
        time.sleep(2)
        png = urllib.request.urlopen(f"{mlflow_ui}/get-artifact?path=confusion_matrix_test.png&run_uuid={run_id}")
        assert png.status == 200 and png.read(8) == b"\x89PNG\r\n\x1a\n"
        driver.save_screenshot(str(SHOTS / "mlflow-ui-trial-artifacts.png"))
        # Last: the UI keeps the link's filter for the experiment's runs view.
        printed_link_ranks_trials_with_their_datasets_and_models(driver, mlflow_ui, link, exp["experiment_id"])
    finally:
        driver.quit()
