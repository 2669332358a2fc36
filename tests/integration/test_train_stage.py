"""The train stage, a tuning trial and a fold train through one routine and log one set of MLflow
params; `tumorscope train --baseline` keeps the untuned model apart from the one DVC tracks."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tumorscope.config import load_params, with_overrides
from tumorscope.stages import training
from tumorscope.tracking import absolute_sqlite_uri
from tumorscope.tuning.study import load_study, open_study, run_worker

pytestmark = pytest.mark.slow


def test_baseline_trains_beside_the_tracked_model_and_logs_what_trials_log(project):
    import mlflow

    params = with_overrides(load_params("params.yaml"), {"tune": {"n_trials": 1}})
    line = training.run_train(params, baseline=True)
    assert line.startswith("train: baseline (params.yaml train.*): small_cnn 2 epochs")
    baseline = project / params.train.model_dir / "baseline"
    assert (baseline / "model.keras").is_file()
    assert not (project / params.train.model_dir / "model.keras").exists()  # DVC's output untouched
    summary = json.loads((baseline / "train.json").read_text())
    assert "seconds" not in json.dumps(summary)  # times live in MLflow, not in files DVC tracks

    handle = open_study(params)
    run_worker(params, handle)
    trial = load_study(params).get_trials(deepcopy=False)[0]
    mlflow.set_tracking_uri(absolute_sqlite_uri(params.mlflow.tracking_uri))
    train_run = mlflow.get_run(summary["run_id"])
    trial_run = mlflow.get_run(trial.user_attrs["mlflow_run_id"])
    assert set(train_run.data.params) - {"classes"} == set(trial_run.data.params)
    assert float(train_run.data.params["train.lr"]) == params.train.lr  # untuned: params.yaml's value
    for run in (train_run, trial_run):
        assert {"final_val_macro_f1", "epochs_run", "fit_seconds"} <= set(run.data.metrics)
        assert run.data.tags["dataset_fingerprint"] != "unknown"


def test_train_without_a_study_says_to_tune_first(project):
    result = subprocess.run([sys.executable, "-m", "tumorscope.cli", "train"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == "error: reports/best_params.json not found (run the tune stage first)"
