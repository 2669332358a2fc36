"""The drift history as a person sees it: four windows compared against one reference (two from
the same distribution, then two increasingly shifted) stored with add_to_workspace in a local
Evidently workspace, the real ``evidently ui`` serving it, its HTTP API listing the project, the four
runs and a rising series for each dashboard panel, and the project dashboard in headless Chromium
plotting one point per run in both panels.

With TUMORSCOPE_SCREENSHOTS=1 the dashboard's screenshot is also written to docs/img/evidently-ui.png
(the picture in the docs); otherwise only to the test's tmp_path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from helpers.browser import browser
from helpers.params import section
from helpers.paths import REPO
from helpers.processes import answers_200, free_port, stop, wait_until
from helpers.requirements import needs_chromium
from tumorscope.config import MonitorConfig
from tumorscope.monitoring import drift, features

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
PROJECT = "tumorscope-drift"
SCREENSHOT = REPO / "docs" / "img" / "evidently-ui.png"
PANEL_TITLES = [title for title, _, _ in drift.DASHBOARD_PANELS]
# (embedding shift, image features shifted by as much): drift that rises window after window.
WINDOWS = [(0.0, ()), (0.0, ()), (0.5, features.IMAGE_FEATURES[:3]), (1.5, features.IMAGE_FEATURES[:8])]


def _window(n: int, rng, shift: float = 0.0, shifted: tuple[str, ...] = ()) -> pd.DataFrame:
    """A feature frame as the inference log gives it (columns as in tests/unit/test_monitoring_core.py)."""
    rows = {name: rng.normal(100 + (shift * 10 if name in shifted else 0.0), 10, n) for name in features.IMAGE_FEATURES}
    rows |= {"height": np.full(n, 512.0), "width": np.full(n, 512.0), "bit_depth": np.full(n, 8.0)}
    rows["predicted_class"] = rng.choice(["Cyst", "Normal", "Tumor"], n, p=[0.3, 0.5, 0.2])
    rows["confidence"] = rng.uniform(0.6, 1.0, n)
    rows |= {f"emb_{i}": rng.normal(shift, 1, n) for i in range(4)}
    return pd.DataFrame(rows)


def _history(workspace: Path) -> tuple[str, list[str]]:
    import sklearn.manifold  # noqa: F401  (loads the OpenMP runtime that the limit below applies to)
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(1)
    reference = _window(100, rng)
    statuses, project_id = [], ""
    # The embedding drift widget runs a t-SNE (sklearn, OpenMP): on 2 busy cores its threads spin
    # against each other and one report takes 1-35 s instead of 0.4 s on one thread.
    settings = drift.DriftSettings.of(section(MonitorConfig), min_window=30)
    with threadpool_limits(limits=1, user_api="openmp"):
        for i, (shift, shifted) in enumerate(WINDOWS):
            result = drift.compare(reference, _window(60, rng, shift, shifted), settings)
            statuses.append(result.summary["status"])
            project_id = drift.add_to_workspace(result.snapshot, workspace, PROJECT, f"window-{i}")
    return project_id, statuses


def _get(url: str):
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def _post(url: str, body: dict):
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


# Per dashboard card: its title and how many points its line chart plots.
PLOTTED = """return [...document.querySelectorAll('.MuiCard-root')].map(card => [
    card.querySelector('h5') ? card.querySelector('h5').textContent : '',
    card.querySelectorAll('.MuiMarkElement-root').length])"""


@needs_chromium
def test_the_evidently_ui_plots_the_drift_history_of_the_workspace(tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    workspace = tmp_path / "workspace"
    project_id, statuses = _history(workspace)
    assert statuses == [drift.NO_DRIFT, drift.NO_DRIFT, drift.DRIFT, drift.DRIFT]

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "evidently-ui.log"
    env = {**os.environ, "DO_NOT_TRACK": "1"}
    driver = server = None
    with log.open("w") as output:
        try:
            server = subprocess.Popen([str(BIN / "evidently"), "ui", "--workspace", str(workspace), "--host", "127.0.0.1",
                                       "--port", str(port)], env=env, stdout=output, stderr=subprocess.STDOUT)
            wait_until(answers_200(f"{url}/api/projects"), 60, "evidently ui", server, log)

            projects = _get(f"{url}/api/projects")
            assert [(p["id"], p["name"]) for p in projects] == [(project_id, PROJECT)]
            snapshots = _get(f"{url}/api/projects/{project_id}/snapshots")
            runs = [s["name"] for s in sorted(snapshots, key=lambda s: s["timestamp"])]
            assert runs == [f"window-{i}" for i in range(len(WINDOWS))]

            # The dashboard as stored, and the series the UI asks for with its panels' own filters:
            # one value per run in each panel, higher after the shift than before it.
            dashboard = _get(f"{url}/api/v2/dashboards/{project_id}")
            assert [p["title"] for p in dashboard["panels"]] == PANEL_TITLES
            for panel in dashboard["panels"]:
                wanted = [{k: v[k] for k in ("metric", "metric_labels", "tags", "metadata")} for v in panel["values"]]
                data = _post(f"{url}/api/v2/snapshots/{project_id}/data_series_batch", {"series_filter": wanted})
                assert len(data["sources"]) == len(WINDOWS), panel["title"]
                assert len(data["series"]) == 1, (panel["title"], data["series"])
                values = data["series"][0]["values"]
                assert None not in values and len(values) == len(WINDOWS), (panel["title"], values)
                assert max(values[:2]) < min(values[2:]) and values[3] >= values[2], (panel["title"], values)

            driver = browser("1400,1320")
            driver.get(f"{url}/projects/{project_id}")
            wait = WebDriverWait(driver, 45)
            wait.until(lambda d: {t for t, n in d.execute_script(PLOTTED) if n >= len(WINDOWS)} >= set(PANEL_TITLES))
            assert dict(driver.execute_script(PLOTTED)) == dict.fromkeys(PANEL_TITLES, len(WINDOWS))
            title = driver.find_element(By.XPATH, f"//h5[normalize-space()='{PANEL_TITLES[0]}']")
            assert title.is_displayed()
            assert PROJECT in driver.find_element(By.TAG_NAME, "body").text
            time.sleep(1.5)  # the charts' appearing animation
            driver.save_screenshot(str(tmp_path / "dashboard.png"))
            if os.environ.get("TUMORSCOPE_SCREENSHOTS") == "1":
                SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
                driver.save_screenshot(str(SCREENSHOT))
        finally:
            if driver is not None:
                driver.quit()
            stop(server)
