"""`tumorscope review` on a project: readings recorded from the command line and from a Label Studio
export, harvested into a batch that `tumorscope ingest` takes like any added batch; user mistakes
are one line each."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tumorscope.config import load_params
from tumorscope.review.queue import ReviewQueue

pytestmark = pytest.mark.slow


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tumorscope.cli", *args], capture_output=True, text=True, timeout=300)


def test_readings_from_the_cli_and_label_studio_become_a_batch_ingest_takes(project, tmp_path):
    from tumorscope.data.images import read_greyscale

    params = load_params("params.yaml")
    queue = ReviewQueue(params.review.queue_dir)
    raw = sorted(p for p in Path(params.data.raw_dir).rglob("*") if p.is_file())
    new = np.random.default_rng(0).integers(0, 256, (3, 48, 48), dtype=np.uint8)  # slices the data lacks
    probabilities = {"Cyst": 0.1, "Normal": 0.2, "Stone": 0.1, "Tumor": 0.6}
    ids = [queue.add(p, {"class": "Tumor", "probabilities": probabilities, "refer": True,
                         "refer_reason": "prediction set holds 2 classes"}, "tumorscope-kidney-ct/1", f"r{i}", "referred")
           for i, p in enumerate([*new, read_greyscale(raw[0], params.data.dicom_window)[0]])]

    listed = cli("review", "list")
    assert listed.returncode == 0 and listed.stdout.strip().endswith("review: 4 pending item(s) in review")
    done = cli("review", "label", ids[0], "Cyst", "--reviewer", "dr-a")
    assert done.returncode == 0 and done.stdout.strip() == f"review: {ids[0]} read as Cyst by dr-a"
    again = cli("review", "label", ids[0], "Tumor", "--reviewer", "dr-b")
    assert again.stdout.strip() == f"review: {ids[0]} read as Tumor by dr-b (was Cyst)"

    exported = cli("review", "export", str(tmp_path / "tasks.json"))
    assert exported.returncode == 0, exported.stderr
    tasks = json.loads((tmp_path / "tasks.json").read_text())
    assert [t["data"]["item"] for t in tasks] == ids[1:]  # the pending ones
    assert (tmp_path / "tasks.label_config.xml").read_text().startswith("<View>")
    annotated = [task | {"annotations": [{"completed_by": {"email": "reader@hospital.example"}, "result": [
        {"from_name": "class", "to_name": "image", "type": "choices", "value": {"choices": [label]}}]}]}
        for task, label in zip(tasks, ["Stone", "Normal", "Normal"], strict=True)]
    (tmp_path / "export.json").write_text(json.dumps(annotated))
    imported = cli("review", "import", str(tmp_path / "export.json"))
    assert imported.stdout.strip() == "review: 3 reading(s) applied, 0 skipped (cancelled or empty), 0 refused"

    harvested = cli("review", "harvest", "--name", "reviewed-test")
    assert harvested.returncode == 0, harvested.stderr
    assert "harvested 3 slice(s) {'Normal': 1, 'Stone': 1, 'Tumor': 1}" in harvested.stdout
    assert "1 excluded" in harvested.stdout  # the slice that is already in the data
    batch = Path(params.data.added_dir) / "reviewed-test"
    ingested = cli("ingest")
    assert ingested.returncode == 0, ingested.stderr
    assert f"incl. 3 from 1 added batch(es) in {params.data.added_dir}" in ingested.stdout
    assert (batch / "provenance.csv").is_file()


@pytest.mark.parametrize(("args", "message"), [
    (["review", "label", "0" * 24, "Cyst", "--reviewer", "dr-a"], "error: no review item '000000000000000000000000'"),
    (["review", "import", "missing.json"], "error: Label Studio export not found: missing.json"),
    (["review", "harvest"], "error: nothing to harvest: no labelled item in review"),
    (["review", "export", "tasks.json"], "error: nothing to export: no pending item in review"),
    (["review", "list", "--status", "done"], "error: --status must be all, pending, labelled or harvested, not 'done'"),
    (["review", "accuracy"], "error: registered model 'tumorscope-kidney-ct' has no alias 'champion'"),
])
def test_review_mistakes_are_one_line(project, args, message):
    done = cli(*args)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(message), done.stderr  # after MLflow's own start-up lines


def test_readers_who_disagree_with_the_champion_raise_the_accuracy_alert(project):
    """The champion (a registered version with its test recall, in the project's MLflow store) is
    read wrong on tumours: `tumorscope review accuracy` alerts and logs review.* on its run."""
    import mlflow

    from tumorscope.tracking import absolute_sqlite_uri

    params = load_params("params.yaml")
    mlflow.set_tracking_uri(absolute_sqlite_uri(params.mlflow.tracking_uri))
    client = mlflow.MlflowClient()
    run = client.create_run(client.create_experiment("champion-test", artifact_location=str(project / "artifacts")))
    client.log_metric(run.info.run_id, "test_recall_Tumor", 0.92)
    name = params.promote.registered_model
    client.create_registered_model(name)
    version = client.create_model_version(name, f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
    client.set_registered_model_alias(name, "champion", version.version)

    queue = ReviewQueue(params.review.queue_dir)
    probabilities = {"Cyst": 0.1, "Normal": 0.6, "Stone": 0.1, "Tumor": 0.2}
    rng = np.random.default_rng(5)
    for index in range(30):  # decided answers the model called Normal, read as tumours
        item = queue.add(rng.integers(0, 256, (32, 32), dtype=np.uint8), {"class": "Normal", "probabilities": probabilities,
                                                                           "refer": False}, f"{name}/{version.version}",
                         f"r{index}", "sampled")
        queue.label(item, "Tumor" if index < 20 else "Normal" if index < 26 else "Cyst", "dr-a")

    done = cli("review", "accuracy")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"review accuracy: ALERT: {name}/{version.version}: 30 read answers (30 decided")
    assert "Tumor recall on reviewed answers 0.00" in done.stdout and "below the champion's test recall 0.92" in done.stdout
    report = json.loads(Path(params.review.report_path).read_text())
    assert report["alert"] and report["decided"]["accuracy"] == pytest.approx(6 / 30)
    metrics = client.get_run(run.info.run_id).data.metrics
    assert metrics["review.alert"] == 1.0 and metrics["review.recall_Tumor"] == 0.0
    # Evidently's classification report of the readings: a file, and a run in the monitoring workspace.
    html = Path(params.review.report_path).with_suffix(".html")
    assert html.stat().st_size > 10_000 and done.stdout.strip().endswith(str(html))
    from evidently.ui.workspace import Workspace

    project = Workspace.create(params.monitor.workspace).search_project(params.monitor.project)[0]
    assert len(Workspace.create(params.monitor.workspace).list_runs(project.id)) == 1
