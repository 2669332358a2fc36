"""The real `dvc repro` on a tiny copy of the project: phantom, and the shared real sample."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, SAMPLE, needs_sample

pytestmark = pytest.mark.slow

TINY = {
    "phantom": {"n_images": 100, "image_size": 64},
    "preprocess": {"image_size": 32},
    "train": {"epochs": 6, "batch_size": 16, "patience": 3},
    # Six epochs on ~70 slices need not learn anything; this test is about the pipeline's
    # mechanics. The constant-prediction guard has its own tests (tests/model, test_cli_errors).
    "evaluate": {"fail_on_degenerate": False, "bootstrap_samples": 200},
    "tune": {"n_trials": 2, "trial_epochs": 2, "min_critical_recall": 0.0,
             "search_space": {"architecture": ["small_cnn"], "lr": {"low": 0.0005, "high": 0.005, "log": True}}},
    "monitor": {"min_window": 20, "phantom_batch": {"n_images": 40, "other": {"image_size": 48}}},
}


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    bin_dir = Path(sys.executable).parent
    # DVC stages call `tumorscope`: make the environment's scripts findable however pytest started.
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
           "PREFECT_HOME": str(cwd / ".prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    result = subprocess.run([str(bin_dir / args[0]), *args[1:]], cwd=cwd, capture_output=True, text=True,
                            timeout=900, env=env)
    assert result.returncode == 0, f"{args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def _deep_update(base: dict, changes: dict) -> dict:
    for key, value in changes.items():
        base[key] = _deep_update(base.get(key, {}), value) if isinstance(value, dict) else value
    return base


def make_project(root: Path, changes: dict) -> Path:
    """A fresh git+DVC repository with this project's pipeline files and tweaked params."""
    for name in ("dvc.yaml", "params.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(REPO / name, root / name)
    with open(root / ".gitignore", "a") as ignore:
        ignore.write("/remote/\n")
    shutil.copytree(REPO / "expectations", root / "expectations")
    for code in ("src", "flows"):
        shutil.copytree(REPO / code, root / code, ignore=shutil.ignore_patterns("__pycache__"))
    params = _deep_update(yaml.safe_load((root / "params.yaml").read_text()), changes)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    _run(["dvc", "init", "-q"], root)
    _run(["dvc", "remote", "add", "-d", "local", str(root / "remote")], root)
    return root


def _check_outputs(project: Path, classes: list[str]) -> dict:
    metrics = json.loads((project / "metrics.json").read_text())
    assert 0.0 <= metrics["macro_f1"] <= 1.0 and isinstance(metrics["degenerate"], bool)
    assert set(metrics["recall"]) == set(classes)
    for plot in ("confusion_matrix.png", "class_histogram.png", "reliability.png", "predictions.csv", "report.json"):
        assert (project / "evaluation" / plot).stat().st_size > 0
    split = json.loads((project / "reports" / "split.json").read_text())
    assert split["cross_split_leaks"] == 0
    bands = json.loads((project / "evaluation" / "report.json").read_text())["accuracy_by_train_distance"]
    assert sum(band["n"] for band in bands) == metrics["n_test"]  # every test slice in one band
    threshold = yaml.safe_load((project / "params.yaml").read_text())["split"]["phash_threshold"]
    # no test slice is within the grouping threshold of a training slice: those bands are empty
    closed = [band for band in bands if not band["distance"].startswith(">=")]
    assert all(band["n"] == 0 for band in closed if int(band["distance"].split("-")[1]) <= threshold)
    validation = json.loads((project / "reports" / "validation.json").read_text())
    assert validation["success"] is True
    assert (project / "reports" / "data_docs").is_dir()
    shown = _run(["dvc", "metrics", "show", "--json"], project).stdout
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
import mlflow.keras
train = json.load(open("{project}/models/train.json"))
model = mlflow.keras.load_model(train["model_uri"])
info = mlflow.models.get_model_info(train["model_uri"])
assert info.metadata["tumorscope_input"] == train["input_spec"] and info.signature is not None
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


def _git(args: list[str], cwd: Path) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True,
                   capture_output=True)


def _tracked_outputs(project: Path) -> dict[str, bytes]:
    """The files a repeated run must reproduce byte for byte."""
    names = ["metrics.json", "data/split.csv", "reports/leaderboard.json", "reports/leaderboard.md",
             "reports/best_params.json", "reports/split.json", "reports/validation.json", "evaluation/report.json",
             "models/model.keras", "reports/promotion.json", "reports/monitoring.json"]
    docs = project / "reports" / "data_docs"
    names += [p.relative_to(project).as_posix() for p in sorted(docs.rglob("*")) if p.is_file()]
    return {name: (project / name).read_bytes() for name in names}


def _stages_run(result: subprocess.CompletedProcess) -> set[str]:
    return {line.split("'")[1] for line in result.stdout.splitlines() if line.startswith("Running stage")}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory) -> tuple[Path, dict[str, bytes], str]:
    """A tiny project after its first `dvc repro`, with a snapshot of its outputs."""
    project = make_project(tmp_path_factory.mktemp("first"), TINY)
    first = _run(["dvc", "repro"], project)
    return project, _tracked_outputs(project), first.stdout


def test_dvc_repro_on_tiny_phantom(first_run):
    project, _, stdout = first_run
    assert "Running stage 'evaluate'" in stdout and "Running stage 'monitor'" in stdout
    _check_outputs(project, ["Cyst", "Normal", "Stone", "Tumor"])
    # The monitor stage judged the incoming batch, or said why it could not (no champion promoted).
    monitored = json.loads((project / "reports" / "monitoring.json").read_text())
    assert monitored["status"] in ("drift", "no_drift", "no_reference"), monitored
    _check_mlflow_run_and_model(project, 4)
    # The phantom's masks and index travel with the raw data.
    assert (project / "data" / "raw" / "_meta" / "kidneyData.csv").is_file()
    second = _run(["dvc", "repro"], project)
    assert "Running stage" not in second.stdout  # an unchanged workspace is a no-op
    # Changing one evaluation knob reruns only evaluate (and promote, which reads its report, and
    # monitor if the promotion report changed); one more trial reruns tune onwards.
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["evaluate"]["distance_bands"] = [3, 8, 12]  # read by evaluate alone
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = _run(["dvc", "repro"], project)
    assert {"evaluate", "promote"} <= _stages_run(third) <= {"evaluate", "promote", "monitor"}
    params["tune"]["n_trials"] = 3
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    fourth = _run(["dvc", "repro"], project)
    # train/evaluate/promote rerun only if the extra trial changed the winner (best_params.json).
    assert "tune" in _stages_run(fourth) and _stages_run(fourth) <= {"tune", "train", "evaluate", "promote", "monitor"}
    leaderboard = json.loads((project / "reports" / "leaderboard.json").read_text())
    assert sum(leaderboard["states"].get(s, 0) for s in ("COMPLETE", "PRUNED")) == 3  # the same study, grown
    _run(["dvc", "push"], project)
    assert any((project / "remote").rglob("*"))

    # A clone that pulls the results has nothing to rerun: every output is in git or the remote,
    # and no output holds an absolute path or a time that would differ there.
    _git(["add", "-A"], project)
    _git(["commit", "-q", "-m", "results"], project)
    clone = project.parent / "clone"
    _git(["clone", "-q", str(project), str(clone)], project.parent)
    _run(["dvc", "pull", "-q"], clone)
    status = _run(["dvc", "status"], clone)
    assert "up to date" in status.stdout, status.stdout
    assert "Running stage" not in _run(["dvc", "repro"], clone).stdout


def test_a_second_fresh_run_repeats_the_first_byte_for_byte(first_run, tmp_path):
    """Seeded Keras, a seeded sampler and no times or run ids in the outputs: the same code and
    params give the same split, study, model scores and leaderboard in a fresh project."""
    _, first_outputs, _ = first_run
    project = make_project(tmp_path, TINY)
    _run(["dvc", "repro"], project)
    second_outputs = _tracked_outputs(project)
    differing = [name for name in first_outputs if first_outputs[name] != second_outputs[name]]
    assert not differing, f"outputs differ between two fresh runs: {differing}"


@needs_sample
def test_dvc_repro_on_shared_real_sample(tmp_path):
    project = make_project(tmp_path, {**TINY, "data": {"source": str(SAMPLE)}})
    _run(["dvc", "repro", "evaluate"], project)
    assert not (project / "data" / "phantom").exists()  # the phantom stage is not an ancestor
    metrics = _check_outputs(project, ["Cyst", "Normal", "Stone", "Tumor"])
    assert metrics["n_test"] >= 30
    split = json.loads((project / "reports" / "split.json").read_text())
    assert split["n_images"] == 240 and split["exact_duplicate_files"] == 18
