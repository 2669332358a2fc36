"""Drift monitoring on a real champion: a small phantom model promoted in a real MLflow registry,
windows of new phantom patients from the same scanner and from another one, the service's own
inference-log records and real CT slices. The closed loop (drift -> alert -> the experiment
deployment retrains on old + new data -> the gates decide) is in test_prefect_deployment.py."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from helpers.params import raw_params_with
from helpers.paths import REPO, SAMPLE
from helpers.requirements import needs_sample
from tumorscope.config import load_params, with_overrides
from tumorscope.errors import UserError
from tumorscope.stages import data as data_stages
from tumorscope.stages import monitoring, promotion, training

pytestmark = pytest.mark.slow


def project_params(root: Path) -> dict:
    return {
        "phantom": {"n_images": 240, "image_size": 64},
        "validate": {"min_images_per_class": 5},
        "split": {"train": 0.6, "val": 0.2, "test": 0.2},
        "preprocess": {"image_size": 64},
        # Enough to answer differently for different slices (a constant model has nothing to drift).
        "train": {"epochs": 40, "batch_size": 16, "lr": 0.002, "warmup_epochs": 5, "patience": 15},
        "evaluate": {"fail_on_degenerate": False, "max_single_class_share": 1.0, "bootstrap_samples": 200},
        "tune": {"n_trials": 1, "trial_epochs": 2, "min_critical_recall": 0.0, "pruner": "none",
                 "search_space": {"architecture": ["small_cnn"], "lr": [0.003], "filters": [8], "batch_size": [16]}},
        "promote": {"min_macro_f1_low": 0.0, "min_critical_recall_low": 0.0, "max_ece": 1.0,
                    "require_beating_acquisition_baselines": False},
        "monitor": {"min_window": 30, "current": "data/incoming",
                    "phantom_batch": {"n_images": 120, "out_dir": "data/incoming"}},
        "mlflow": {"tracking_uri": f"sqlite:///{root / 'mlflow.db'}", "artifact_root": str(root / "mlartifacts")},
    }


@pytest.fixture(scope="module")
def champion_project(tmp_path_factory) -> Path:
    """A phantom project with a promoted champion and two new batches: data/same (the training
    scanner, other patients) and data/incoming (another scanner)."""
    root = tmp_path_factory.mktemp("monitoring")
    shutil.copytree(REPO / "expectations", root / "expectations")
    (root / "params.yaml").write_text(yaml.safe_dump(raw_params_with(project_params(root))))
    here = os.getcwd()
    os.chdir(root)
    try:
        params = load_params("params.yaml")
        data_stages.run_data_stages(params)
        training.train_and_save(params, Path(params.train.model_dir), "train", None, "params.yaml train.*")
        training.run_evaluate(params)
        assert "new champion" in promotion.run_promote(params)
        data_stages.run_incoming(params)
        data_stages.run_incoming(with_overrides(params, {"monitor": {"phantom_batch": {
            "scanner": "same", "out_dir": "data/same", "seed": 99}}}))
    finally:
        os.chdir(here)
    return root


@pytest.fixture
def in_project(champion_project: Path, monkeypatch) -> Path:
    monkeypatch.chdir(champion_project)
    return champion_project


def champion_run_metrics(params, name: str) -> list[float]:
    import mlflow

    from tumorscope import tracking

    tracking.configure(params.mlflow)
    client = mlflow.MlflowClient()
    run_id = client.get_model_version_by_alias(params.promote.registered_model, "champion").run_id
    return [m.value for m in sorted(client.get_metric_history(run_id, name), key=lambda m: m.step)]


def test_same_scanner_passes_other_scanner_drifts_and_is_referred_with_report_history_and_mlflow(in_project):
    params = load_params("params.yaml")
    line, same = monitoring.run_monitor(params, "data/same")
    assert same["status"] == "no_drift", line
    # Another window than monitor.current: its own folder, the DVC stage's outputs untouched.
    assert Path(same["written_to"]).parent.parent == Path(params.monitor.checks_dir)
    assert not Path(params.monitor.summary_path).exists()
    assert same["reference"].startswith("computed from") and same["n_current"] == 120
    stored = next(Path(params.monitor.reference_dir).rglob("reference.csv"))
    assert same["model_version"].replace("/", "-") in str(stored)
    line, other = monitoring.run_monitor(params)
    assert other["status"] == "drift" and line.startswith("monitor: DRIFT in folder data/incoming"), line
    assert other["written_to"] == params.monitor.summary_path and line.endswith(f"report {other['report_html']}")
    assert other["reference"] == str(stored)  # computed once per champion version
    assert {"noise", "width", "height"} <= set(other["drifted_features"])
    summary = json.loads(Path(params.monitor.summary_path).read_text())
    assert summary["drift"] is True and summary["features"]["noise"]["drifted"]
    html = Path(params.monitor.report_dir) / "drift.html"
    assert b"Value Drift for column noise" in html.read_bytes()  # the page a person opens
    assert champion_run_metrics(params, "monitor_drift")[-2:] == [0.0, 1.0]
    # Per answer: the other scanner's slices are referred at a clearly higher rate than the same
    # scanner's, which stays at the test split's rate; both rates are in the run's history.
    print(f"\nreferral same scanner {same['referral']}\nother scanner {other['referral']}")
    # This small champion is unsure of most slices (it refers nearly all of either batch for doubt):
    # the share referred as unlike the training slices is what separates the scanners.
    assert same["referral"]["status"] == "steady" and other["referral"]["status"] == "rising", line
    assert other["referral"]["current_rate"] >= same["referral"]["current_rate"]
    assert other["referral"]["current_ood_share"] >= same["referral"]["current_ood_share"] + 0.5
    assert "REFERRAL RISING: referred" in line
    assert champion_run_metrics(params, "monitor_referral_rate")[-2:] == pytest.approx(
        [same["referral"]["current_rate"], other["referral"]["current_rate"]])
    from evidently.ui.workspace import Workspace

    workspace = Workspace(params.monitor.workspace)
    project = workspace.search_project(params.monitor.project)[0]
    assert len(workspace.list_runs(project.id)) >= 2


def service_log_lines(params, folder: Path) -> list[str]:
    """Inference-log lines exactly as the service writes them (same functions, same model)."""
    from tumorscope import tracking
    from tumorscope.api.inference_log import inference_record
    from tumorscope.api.responses import classify_response
    from tumorscope.api.served_model import ServedModel
    from tumorscope.inference import prepare_bytes, stack

    tracking.configure(params.mlflow)
    served = ServedModel(params.promote.registered_model, "champion", params.serve.embedding_dims)
    assert served.load(), served.load_error
    spec = served.current().loaded.spec
    lines = []
    for i, path in enumerate(sorted(folder.rglob("*.png"))):
        data = path.read_bytes()
        prepared = prepare_bytes(data, ".png", spec)
        answer = served.predict(stack([prepared], prepared.pixels.shape[0]))[0]
        response = classify_response(answer, prepared, spec["classes"], "Tumor", 0.5, f"req-{i}")
        lines.append(json.dumps(inference_record("classify", response, data)))
    return lines


def test_inference_log_window_reads_past_bad_lines_and_says_what_it_left_out(in_project, tmp_path):
    params = load_params("params.yaml")
    lines = service_log_lines(params, in_project / "data" / "incoming")
    other_version = json.loads(lines[0]) | {"model_version": "tumorscope-kidney-ct/99"}
    log = tmp_path / "inference.jsonl"
    log.write_text("\n".join([*lines[:40], '{"broken', json.dumps(other_version), *lines[40:]]) + "\n")
    line, summary = monitoring.run_monitor(params, str(log))
    assert summary["status"] == "drift", line
    assert summary["n_current"] == 120
    assert summary["left_out"] == {"corrupt line (not JSON)": 1, "another model version (tumorscope-kidney-ct/99)": 1}
    assert "; left out: " in line and "1 corrupt line (not JSON)" in line.split("; left out: ")[1]
    log.write_text("\n".join(lines[:10]) + "\n")
    line, small = monitoring.run_monitor(params, str(log))
    assert small["status"] == "insufficient_data" and small["drift"] is None and "no verdict" in line


def test_missing_reference_and_missing_window_say_so(in_project):
    params = load_params("params.yaml")
    nobody = with_overrides(params, {"promote": {"registered_model": "no-such-model"}})
    line, summary = monitoring.run_monitor(nobody)
    assert summary["status"] == "no_reference" and summary["drift"] is None and "no-such-model" in line
    assert not (Path(params.monitor.report_dir) / "drift.html").exists()  # no stale report beside the summary
    with pytest.raises(UserError, match="current window nowhere not found"):
        monitoring.run_monitor(params, "nowhere")


@needs_sample
def test_real_slices_are_flagged_against_the_phantom_reference(in_project):
    line, summary = monitoring.run_monitor(load_params("params.yaml"), str(SAMPLE))
    assert summary["status"] == "drift", line
    assert summary["n_current"] == 240
    # Answer by answer, the phantom champion refers real slices, and most as unlike its training data.
    referral = summary["referral"]
    assert referral["status"] == "rising" and referral["current_rate"] >= 0.9, referral
    assert referral["current_ood_share"] >= 0.5, referral
