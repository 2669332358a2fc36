"""The project through a shared MLflow tracking server (`tumorscope mlflow-server`, PostgreSQL
backend, artefacts proxied): training, evaluation, promotion, the Bento service loading the champion
over HTTP, and monitoring, all from a project folder that shares no files with the server's
artefact folder. Also: what the runs table shows (the splits as MLflow datasets) and the
experiment's kind (the UI's model-training view), checked in headless Chromium.

With TUMORSCOPE_SCREENSHOTS=1 the runs table's screenshot is also written to
docs/img/mlflow-ui-datasets.png (the picture in the docs); otherwise only to the test's tmp_path."""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

import httpx
import pytest
import yaml

from helpers import bento
from helpers.browser import browser
from helpers.params import section
from helpers.paths import FIXTURE_SLICES, REPO
from helpers.processes import stop
from helpers.requirements import drop_schema, needs_chromium, needs_postgres, postgres_schema_uri
from helpers.servers import start_mlflow_server

pytestmark = pytest.mark.slow
SCREENSHOT = REPO / "docs" / "img" / "mlflow-ui-datasets.png"


def through_server(project: Path, url: str) -> dict:
    """The project's params.yaml pointed at the server; every other path absolute (the Bento's
    workers run in the repository)."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["mlflow"] |= {"tracking_uri": url, "experiment": "shared-server-test",
                        "artifact_root": str(project / "local-artifacts")}  # must stay unused
    params["promote"] |= {"min_macro_f1_low": 0.0, "min_critical_recall_low": 0.0, "max_ece": 1.0,
                         "require_beating_acquisition_baselines": False,
                         "coverage_tolerance": 1.0}
    params["serve"] |= {"inference_log": str(project / "logs" / "inference.jsonl"), "max_latency_ms": 10000}
    params["review"] |= {"queue_dir": str(project / "review")}
    params["monitor"] |= {"current": str(FIXTURE_SLICES), "min_window": 5,
                         "workspace": str(project / "monitoring" / "workspace")}
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    return params


def runs_table_shows_datasets(url: str, experiment_id: str, dataset: str, shot: Path) -> str:
    """Open the experiment in the MLflow UI; wait until its runs table names ``dataset``; return the page text."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver = browser("1500,900")
    try:
        driver.get(f"{url}/#/experiments/{experiment_id}/runs")
        WebDriverWait(driver, 60).until(lambda d: dataset in d.find_element("tag name", "body").text)
        # A fresh browser starts in MLflow's GenAI navigation and opens its assistant panel: show the
        # model-training navigation, as a team using this project would, and close the panel.
        for xpath in ("//*[normalize-space(text())='Model training']",
                      "//*[normalize-space(text())='MLflow Assistant']/following::button[@aria-label][3]"):
            for element in driver.find_elements("xpath", xpath)[:1]:
                element.click()
                time.sleep(0.5)
        WebDriverWait(driver, 30).until(lambda d: dataset in d.find_element("tag name", "body").text)
        time.sleep(1.0)  # the table's last layout pass
        driver.save_screenshot(str(shot))
        if os.environ.get("TUMORSCOPE_SCREENSHOTS") == "1":
            driver.save_screenshot(str(SCREENSHOT))
        return str(driver.find_element("tag name", "body").text)
    finally:
        driver.quit()


@needs_postgres
@needs_chromium
def test_pipeline_through_a_shared_mlflow_server(project: Path, tmp_path_factory, tmp_path):
    import mlflow

    from tumorscope.config import load_params
    from tumorscope.stages import monitoring, promotion, training

    schema = f"tumorscope_mlflow_server_{uuid.uuid4().hex[:8]}"
    server = start_mlflow_server(tmp_path_factory.mktemp("mlflow-server"), postgres_schema_uri(schema))
    served = None
    try:
        through_server(project, server.url)
        params = load_params("params.yaml")
        training.train_and_save(params, Path(params.train.model_dir), "through-server", None, "test: shared server")
        training.run_evaluate(params)
        line = promotion.run_promote(params)
        assert "is the new champion" in line, line

        # Artefacts went through the server, into its folder; nothing into the project's.
        client = mlflow.MlflowClient()
        experiment = client.get_experiment_by_name("shared-server-test")
        assert experiment.artifact_location.startswith("mlflow-artifacts:"), experiment.artifact_location
        assert not (project / "local-artifacts").exists()
        assert any(path.name == "model.keras" for path in server.artifacts.rglob("*"))
        # The UI opens it in the model-training view, with a description.
        assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
        assert "tumorscope" in experiment.tags["mlflow.note.content"]

        # The train run says what data it saw: the three splits, one digest (the split table's).
        run_id = json.loads((Path(params.train.model_dir) / "train.json").read_text())["run_id"]
        inputs = client.get_run(run_id).inputs.dataset_inputs
        by_context = {next(t.value for t in i.tags if t.key == "mlflow.data.context"): i.dataset for i in inputs}
        assert set(by_context) == {"training", "validation", "testing"}
        assert {d.name.rsplit("-", 1)[1] for d in by_context.values()} == {"train", "val", "test"}
        assert len({d.digest for d in by_context.values()}) == 1
        schema_columns = json.loads(by_context["training"].schema)["mlflow_colspec"]
        assert {"path", "label", "split"} <= {column["name"] for column in schema_columns}

        # The runs table in the MLflow UI (the model-training view) shows the datasets.
        page = runs_table_shows_datasets(server.url, experiment.experiment_id, by_context["training"].name,
                                         tmp_path / "runs.png")
        assert "Dataset" in page.splitlines() and "through-server" in page, page[:2000]

        # The Bento service loads the champion over HTTP from the server and answers.
        report = json.loads((Path(params.train.model_dir) / "train.json").read_text())
        served = bento.start(project, {1: report}, params.promote.registered_model)
        slice_path = sorted(FIXTURE_SLICES.glob("*/*.jpg"))[0]
        answer = httpx.post(f"{served.url}/classify", timeout=60,
                            files={"file": (slice_path.name, slice_path.read_bytes(), "image/jpeg")})
        assert answer.status_code == 200, answer.text
        assert answer.json()["model_version"] == f"{params.promote.registered_model}/1"

        # Monitoring reads the champion's reference from the server and logs its scores there.
        line, summary = monitoring.run_monitor(params)
        assert summary["status"] != monitoring.NO_REFERENCE, line
        assert summary["model_version"] == f"{params.promote.registered_model}/1"
        assert not (project / "local-artifacts").exists()
    finally:
        if served is not None:
            stop(served.process)
        stop(server.process)
        drop_schema(schema)


def test_an_unreachable_server_is_one_line(tmp_path):
    from tumorscope import tracking
    from tumorscope.config import MlflowConfig
    from tumorscope.errors import UserError

    with pytest.raises(UserError, match="cannot reach the MLflow server") as err:
        tracking.configure(section(MlflowConfig, tracking_uri="http://127.0.0.1:9"))
    assert "\n" not in str(err.value)
