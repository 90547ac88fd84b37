"""The MLflow UI in a real browser: headless Debian Chromium driven by Selenium.

`mlflow ui` serves a store holding a frozen and a joint run on 127.0.0.1; the test waits for the
React app to render the runs table with both runs, then the chart view with their validation
metrics overlaid, and saves a screenshot (docs/mlflow-ui.png is one, made from real demo runs:
see `README.md`, "Sweeps, comparison, reproduction").

Environment:
    TFSTACK_UI_STORE       an existing sqlite file to show instead of the test's own two runs
                           (it must hold runs tagged freeze=frozen and freeze=joint)
    TFSTACK_UI_SCREENSHOT  where to save the screenshot (default: under the test's tmp_path)
"""

import contextlib
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
MLFLOW = Path(sys.executable).parent / "mlflow"
# Flags that work in containers and CI: no sandbox, no GPU, nothing fetched in the background.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1500,1000",
]
METRICS = ["val_accuracy", "val_loss"]
EXPERIMENT = "tfstack"

pytestmark = pytest.mark.skipif(
    not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
    reason="needs Debian's chromium and chromium-driver (make test installs them as root)",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _log_demo_runs(db: Path) -> None:
    """A frozen and a joint run as the pipeline records them (tags, params, per-epoch metrics)."""
    from tfstack import tracking

    uri = f"sqlite:///{db}"
    for freeze, rate, final in (("frozen", 0.25, 0.65), ("joint", 0.45, 0.88)):
        run_id = tracking.start_run(
            uri,
            EXPERIMENT,
            run_name=f"freeze={freeze}",
            tags={"freeze": freeze, "stacking": "sequential", "schedule": "single"},
        )
        tracking.log_params_flat(run_id, {"freeze": {"policy": freeze}, "train": {"epochs": 10}})
        for epoch in range(10):
            progress = 1 - math.exp(-rate * (epoch + 1))
            accuracy = 0.2 + (final - 0.2) * progress
            tracking.log_metrics(
                run_id,
                {
                    "accuracy": accuracy + 0.05,
                    "val_accuracy": accuracy,
                    "loss": 1.6 * (1 - progress) + 0.3,
                    "val_loss": 1.6 * (1 - progress) + 0.4,
                },
                step=epoch,
            )
        tracking.log_metrics(run_id, {"test_accuracy": final, "test_loss": 0.5})
        tracking.end_run(run_id)


def _run_names(db: Path) -> tuple[dict[str, str], str]:
    """freeze policy -> the name of its latest run in the store; and the experiment's id."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"])
    names = {}
    for run in runs:
        names.setdefault(run.data.tags.get("freeze"), run.info.run_name)
    return {freeze: names[freeze] for freeze in ("frozen", "joint")}, experiment.experiment_id


@contextlib.contextmanager
def _mlflow_ui(db: Path):
    port = _free_port()
    log = tempfile.TemporaryFile()
    server = subprocess.Popen(
        [str(MLFLOW), "ui", "--backend-store-uri", f"sqlite:///{db}", "--host", "127.0.0.1"]
        + ["--port", str(port), "--workers", "1"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    output = log.read()[-3000:]
                    raise AssertionError(f"mlflow ui did not start:\n{output}") from None
                time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


@contextlib.contextmanager
def _chromium():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="tfstack-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _wait_for_text(driver, texts, timeout=60):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def shown(d):
        body = d.find_element(By.TAG_NAME, "body").text
        return all(text in body for text in texts)

    try:
        WebDriverWait(driver, timeout, poll_frequency=0.5).until(shown)
    except TimeoutException:
        body = driver.find_element(By.TAG_NAME, "body").text
        missing = [text for text in texts if text not in body]
        raise AssertionError(f"{missing} never appeared; the page shows:\n{body[:2000]}") from None


def _expand_parents(driver) -> None:
    """Unfold sweep parents (a tfstack sweep nests its jobs' runs under one parent run)."""
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.common.by import By

    expanders = "button[data-component-id*='runnamecellrenderer']"
    for button in driver.find_elements(By.CSS_SELECTOR, expanders):
        with contextlib.suppress(WebDriverException):
            button.click()


def _close_assistant(driver) -> None:
    """MLflow 3 opens an assistant side panel; close it so the screenshot shows the runs."""
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.common.by import By

    for button in driver.find_elements(By.CSS_SELECTOR, "button[aria-label]"):
        with contextlib.suppress(WebDriverException):  # the page may re-render meanwhile
            label = (button.get_attribute("aria-label") or "").lower()
            if "close" in label and button.is_displayed():
                button.click()


@pytest.mark.slow
def test_mlflow_ui_shows_frozen_and_joint_runs_and_their_metrics(tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    store = os.environ.get("TFSTACK_UI_STORE")
    db = Path(store).resolve() if store else tmp_path / "mlflow.db"
    if not store:
        _log_demo_runs(db)
    names, experiment_id = _run_names(db)
    screenshot = Path(os.environ.get("TFSTACK_UI_SCREENSHOT", tmp_path / "mlflow-ui.png"))

    with _mlflow_ui(db) as url, _chromium() as driver:
        # The runs table: a React app that renders after its API calls return.
        driver.get(f"{url}/#/experiments/{experiment_id}/runs")
        _wait_for_text(driver, ["matching runs"])
        _expand_parents(driver)
        _wait_for_text(driver, list(names.values()))
        _close_assistant(driver)
        # The chart view overlays the runs' metrics, one chart per metric name.
        driver.get(f"{url}/#/experiments/{experiment_id}/runs?compareRunsMode=CHART")
        _wait_for_text(driver, [*names.values(), "Model metrics"])
        # Charts render lazily as they scroll into view: search brings each one up.
        search = driver.find_element(By.CSS_SELECTOR, "input[placeholder*='Search metric']")
        search.send_keys("test_", Keys.ENTER)
        _wait_for_text(driver, ["test_accuracy", "test_loss"])
        search.send_keys(Keys.CONTROL, "a")
        search.send_keys(Keys.BACKSPACE)
        search.send_keys("val_", Keys.ENTER)
        # Each chart's legend names both runs once its data have loaded.
        legends = [f"{name} ({metric})" for name in names.values() for metric in METRICS]
        _wait_for_text(driver, legends)
        time.sleep(1)  # the charts' draw animation
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        assert driver.save_screenshot(str(screenshot))
    assert screenshot.stat().st_size > 20_000
