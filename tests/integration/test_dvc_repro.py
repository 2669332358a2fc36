"""The real `dvc repro` on a tiny copy of the project: phantom, and the shared real sample."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers.paths import SAMPLE
from helpers.projects import TINY, copy_project, git, make_project, run_tool, tracked_outputs
from helpers.requirements import needs_sample

pytestmark = pytest.mark.slow


def _check_outputs(project: Path, classes: list[str]) -> dict:
    metrics = json.loads((project / "metrics.json").read_text())
    assert 0.0 <= metrics["macro_f1"] <= 1.0 and isinstance(metrics["degenerate"], bool)
    assert set(metrics["recall"]) == set(classes)
    for plot in ("confusion_matrix.png", "class_histogram.png", "reliability.png", "predictions.csv", "report.json"):
        assert (project / "evaluation" / plot).stat().st_size > 0
    split = json.loads((project / "reports" / "split.json").read_text())
    assert split["cross_split_leaks"] == 0
    report = json.loads((project / "evaluation" / "report.json").read_text())
    # Calibration, conformal sets and referral were fitted on validation slices and scored on test.
    trust = report["trust"]
    assert trust["calibration"]["temperature"] > 0 and trust["conformal"]["target_coverage"] == 0.9
    assert 0.0 <= metrics["coverage"] <= 1.0 and 0.0 <= metrics["referred"] <= 1.0
    assert 0.0 <= metrics["mean_set_size"] <= len(classes) and set(metrics["coverage_per_class"]) <= set(classes)
    assert sum(trust["referral"]["referred_because"].values()) == round(metrics["referred"] * metrics["n_test"])
    assert (project / "evaluation" / "reliability_calibrated.png").stat().st_size > 0
    assert len((project / "evaluation" / "risk_coverage.csv").read_text().splitlines()) == metrics["n_test"] + 1
    bands = report["accuracy_by_train_distance"]
    assert sum(band["n"] for band in bands) == metrics["n_test"]  # every test slice in one band
    threshold = yaml.safe_load((project / "params.yaml").read_text())["split"]["phash_threshold"]
    # no test slice is within the grouping threshold of a training slice: those bands are empty
    closed = [band for band in bands if not band["distance"].startswith(">=")]
    assert all(band["n"] == 0 for band in closed if int(band["distance"].split("-")[1]) <= threshold)
    validation = json.loads((project / "reports" / "validation.json").read_text())
    assert validation["success"] is True
    assert (project / "reports" / "data_docs").is_dir()
    shown = run_tool(["dvc", "metrics", "show", "--json"], project).stdout
    assert "macro_f1" in shown
    return metrics


def _check_mlflow_run_and_model(project: Path, n_classes: int) -> None:
    """The run holds params and metrics; its MLflow model (a native .keras inside, the input spec in
    its metadata) loads back with mlflow.keras and predicts like the DVC-tracked models/model.keras,
    and the promote stage registered it."""
    code = f"""
import json, mlflow, numpy as np, keras
mlflow.set_tracking_uri("sqlite:///{project}/mlflow.db")
run_id = json.load(open("{project}/models/train.json"))["run_id"]
run = mlflow.get_run(run_id)
assert run.data.params["train.architecture"] == "small_cnn", run.data.params
best = json.load(open("{project}/reports/best_params.json"))
parent = mlflow.get_run(run.data.tags["mlflow.parentRunId"])  # nested under the study's run
assert parent.data.tags["optuna_study"] == best["study_name"], parent.data.tags
assert float(run.data.params["train.lr"]) == best["train"]["lr"]  # the tuned value was trained
assert "test_macro_f1" in run.data.metrics and "dataset_fingerprint" in run.data.tags
assert {{"test_coverage", "test_ece_calibrated", "test_referred", "temperature"}} <= set(run.data.metrics), run.data.metrics
import mlflow.keras
train = json.load(open("{project}/models/train.json"))
model = mlflow.keras.load_model(train["model_uri"])
info = mlflow.models.get_model_info(train["model_uri"])
assert info.metadata["tumorscope_input"] == train["input_spec"] and info.signature is not None
assert info.metadata["tumorscope_trust"]["temperature"] == train["trust"]["temperature"]  # travels with the model
x = np.load("{project}/data/cache/test_x.npy")
p = model.predict(x, verbose=0)
assert p.shape == (len(x), {n_classes}) and np.allclose(p.sum(axis=1), 1, atol=1e-4)
tracked = keras.saving.load_model("{project}/models/model.keras").predict(x, verbose=0)
assert np.allclose(p, tracked, atol=1e-6)
version = mlflow.MlflowClient().search_model_versions(f"run_id = '{{run_id}}'")[0]  # promote registered it
assert version.name == "tumorscope-kidney-ct"
history = mlflow.tracking.MlflowClient().get_metric_history(run_id, "val_loss")
assert len(history) >= 1
print("mlflow ok")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "mlflow ok" in result.stdout, result.stderr[-3000:]


def _stages_run(result: subprocess.CompletedProcess) -> set[str]:
    return {line.split("'")[1] for line in result.stdout.splitlines() if line.startswith("Running stage")}


@pytest.mark.xdist_group("tiny-dvc")  # the session's tiny dvc repro is on this group's worker
def test_dvc_repro_on_tiny_phantom(tiny_dvc_run, tmp_path, prefect_server):
    assert "Running stage 'evaluate'" in tiny_dvc_run.stdout and "Running stage 'monitor'" in tiny_dvc_run.stdout
    project = copy_project(tiny_dvc_run.project, tmp_path / "project")
    server = prefect_server.env()
    _check_outputs(project, ["Cyst", "Normal", "Stone", "Tumor"])
    # The monitor stage judged the incoming batch against the champion the promote stage made.
    monitored = json.loads((project / "reports" / "monitoring.json").read_text())
    assert monitored["status"] in ("drift", "no_drift"), monitored
    # dvc metrics (and dvc exp show) list the promotion decision and the drift verdict.
    shown = json.loads(run_tool(["dvc", "metrics", "show", "--json"], project).stdout)
    workspace = shown[""]["data"]  # "": the workspace
    promoted = json.loads((project / "reports" / "promotion.json").read_text())["promoted"]
    assert workspace["reports/promotion_metrics.json"]["data"]["promoted"] is promoted
    assert workspace["reports/monitoring_metrics.json"]["data"]["drift"] is monitored["drift"]
    # The learning curves are a DVC plot: one row per epoch the train stage ran.
    history = (project / "models" / "history.tsv").read_text().splitlines()
    epochs = json.loads((project / "models" / "train.json").read_text())["epochs_run"]
    assert history[0].startswith("epoch\t") and len(history) == epochs + 1
    assert "history.tsv" in run_tool(["dvc", "plots", "show", "--json"], project).stdout
    _check_mlflow_run_and_model(project, 4)
    # The phantom's masks and index travel with the raw data.
    assert (project / "data" / "raw" / "_meta" / "kidneyData.csv").is_file()
    second = run_tool(["dvc", "repro"], project, **server)
    assert "Running stage" not in second.stdout  # an unchanged workspace is a no-op
    # Changing one evaluation knob reruns only evaluate (and promote, which reads its report, and
    # monitor if the promotion report changed). (A study grown by one more trial: test_tuning.py;
    # tune.n_trials left out of the study's identity: test_tuning_space.py.)
    params = yaml.safe_load((project / "params.yaml").read_text())
    # A train setting every trial uses (one dvc.yaml once left out) makes the study stale too.
    augmented = yaml.safe_load((project / "params.yaml").read_text())
    augmented["train"]["intensity_augment"] = 0.1
    (project / "params.yaml").write_text(yaml.safe_dump(augmented, sort_keys=False))
    stale = json.loads(run_tool(["dvc", "status", "--json"], project).stdout)
    assert {"tune", "train"} <= set(stale), stale
    params["evaluate"]["distance_bands"] = [3, 8, 12]  # read by evaluate alone
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = run_tool(["dvc", "repro"], project, **server)
    assert {"evaluate", "promote"} <= _stages_run(third) <= {"evaluate", "promote", "monitor"}
    run_tool(["dvc", "push"], project)
    assert any((project / "remote").rglob("*"))

    # A clone that pulls the results has nothing to rerun: every output is in git or the remote,
    # and no output holds an absolute path or a time that would differ there.
    git(["add", "-A"], project)
    git(["commit", "-q", "-m", "results"], project)
    clone = project.parent / "clone"
    git(["clone", "-q", str(project), str(clone)], project.parent)
    run_tool(["dvc", "pull", "-q"], clone)
    status = run_tool(["dvc", "status"], clone)
    assert "up to date" in status.stdout, status.stdout
    assert "Running stage" not in run_tool(["dvc", "repro"], clone, **server).stdout


@pytest.mark.xdist_group("tiny-dvc")
def test_a_second_fresh_run_repeats_the_first_byte_for_byte(tiny_dvc_run, tmp_path, prefect_server):
    """Seeded Keras, a seeded sampler and no times or run ids in the outputs: the same code and
    params give the same split, study, model scores and leaderboard in a fresh project."""
    project = make_project(tmp_path / "project", tiny_dvc_run.changes)
    run_tool(["dvc", "repro"], project, **prefect_server.env())
    second_outputs = tracked_outputs(project)
    differing = [name for name in tiny_dvc_run.outputs if tiny_dvc_run.outputs[name] != second_outputs[name]]
    assert not differing, f"outputs differ between two fresh runs: {differing}"


@needs_sample
def test_dvc_repro_on_shared_real_sample(tmp_path, prefect_server):
    project = make_project(tmp_path / "project", {**TINY, "data": {"source": str(SAMPLE)}})
    run_tool(["dvc", "repro", "evaluate"], project, **prefect_server.env())
    assert not (project / "data" / "phantom").exists()  # the phantom stage is not an ancestor
    metrics = _check_outputs(project, ["Cyst", "Normal", "Stone", "Tumor"])
    assert metrics["n_test"] >= 30
    split = json.loads((project / "reports" / "split.json").read_text())
    assert split["n_images"] == 240 and split["exact_duplicate_files"] == 18
