"""The train stage, a tuning trial and a fold train through one routine and log one set of MLflow
params; `tumorscope train --baseline` keeps the untuned model apart from the one DVC tracks."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from helpers.params import defaults
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


def test_an_ensemble_trains_saves_and_answers_as_one_model(project):
    """train.ensemble_members: 2 seeds of one configuration in one .keras file, their trust layer
    fitted on the ensemble's answers, and predict reads it as any model; trials ignore it."""
    import keras
    import pandas as pd

    from tumorscope.artifacts import TRAIN_BACKUP_DIR
    from tumorscope.models.ensemble import member_bodies
    from tumorscope.models.explain import grad_cam
    from tumorscope.stages import prediction
    from tumorscope.tuning.study import stored_study_name

    params = with_overrides(load_params("params.yaml"), {"train": {"ensemble_members": 2}})
    assert stored_study_name(params) == stored_study_name(load_params("params.yaml"))
    line = training.run_train(params, baseline=True)
    assert "an ensemble of 2 (seeds 42-43" in line, line
    folder = project / params.train.model_dir / "baseline"
    summary = json.loads((folder / "train.json").read_text())
    assert summary["ensemble"]["seeds"] == [params.seed, params.seed + 1]
    assert len(summary["ensemble"]["member_val_macro_f1"]) == 2 and summary["epochs_run"] == sum(
        summary["ensemble"]["member_epochs"])
    assert summary["trust"]["ood"]["embedding_dims"] and summary["trust"]["temperature"] > 0
    assert not (project / TRAIN_BACKUP_DIR / "ensemble").exists()  # the finished members are not left behind
    model = keras.saving.load_model(folder / "model.keras")
    assert len(member_bodies(model)) == 2
    assert {"val_loss", "member_1.val_loss"} <= set(summary["history"])

    line = prediction.run_predict(params, [project / "data" / "raw"], model=str(folder), out=project / "out.csv")
    table = pd.read_csv(project / "out.csv", keep_default_na=False)
    assert len(table) > 0 and (table["error"] == "").all() and set(table["predicted"]) <= set(summary["classes"])
    assert table["model_version"].iloc[0].startswith("file:")
    image = np.zeros(model.input_shape[1:], np.uint8)
    assert grad_cam(model, image).shape == model.input_shape[1:3]


def test_a_killed_ensemble_keeps_its_finished_members(project, monkeypatch):
    """Killed while training the second member: run again, the first is read back, not retrained."""
    from tumorscope.models import train as train_module

    params = with_overrides(load_params("params.yaml"), {"train": {"ensemble_members": 2}})
    real_fit, seeds, kill = train_module.fit_and_score, [], True

    def killed_at_the_second_member(cfg, image_size, classes, seed, *args, **kwargs):
        seeds.append(seed)
        if seed == params.seed + 1 and kill:
            raise KeyboardInterrupt("killed")
        return real_fit(cfg, image_size, classes, seed, *args, **kwargs)

    monkeypatch.setattr(train_module, "fit_and_score", killed_at_the_second_member)
    with pytest.raises(KeyboardInterrupt):
        training.run_train(params, baseline=True)
    first = json.loads((project / ".train-backup" / "ensemble" / "finished-0" / "member.json").read_text())
    seeds.clear()
    kill = False
    training.run_train(params, baseline=True)  # the wrapper now only counts: the second member trains
    assert seeds == [params.seed + 1]
    summary = json.loads((project / params.train.model_dir / "baseline" / "train.json").read_text())
    assert summary["ensemble"]["member_val_macro_f1"][0] == first["val_macro_f1"]
    assert not (project / ".train-backup" / "ensemble").exists()


def test_without_a_study_the_train_stage_trains_params_yaml_configuration(project):
    """tune.n_trials 0 (a retraining reusing the champion's settings): `tumorscope tune` writes the
    stage's outputs in seconds with params.yaml's values, and train trains them."""
    import yaml

    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["tune"]["n_trials"] = 0
    raw["train"]["lr"] = 0.0021
    (project / "params.yaml").write_text(yaml.safe_dump(raw))
    tuned = subprocess.run([sys.executable, "-m", "tumorscope.cli", "tune"], capture_output=True, text=True, timeout=300)
    assert tuned.returncode == 0, tuned.stderr
    assert tuned.stdout.strip().startswith("tune: tune.n_trials is 0: no study; the configuration is params.yaml's train.*")
    best = json.loads((project / "reports" / "best_params.json").read_text())
    assert best["study_name"] is None and best["train"]["lr"] == 0.0021
    board = json.loads((project / "reports" / "leaderboard.json").read_text())
    assert board["leaderboard"] == [] and board["states"] == {}  # no trial ran
    line = training.run_train(load_params("params.yaml"))
    assert line.startswith("train: params.yaml train.* (tune.n_trials 0: no study): small_cnn")


def test_a_retraining_reuses_the_champions_tuned_settings():
    """The champion's MLflow run params (as tracking.fit_params logs them: str() of each value) become
    `dvc exp run -S` settings of every searched train.* setting, with no study."""
    from flows.experiment import champion_settings
    from tumorscope.errors import UserError

    params = defaults()
    run_params = {f"train.{k}": str(v) for k, v in params.train.model_dump().items()} | {
        "train.lr": "0.00123", "train.filters": "32", "train.architecture": "small_cnn"}
    settings = champion_settings(params, run_params)
    assert set(settings) == {"tune.n_trials"} | {f"train.{k}" for k in params.tune.search_space}
    assert settings["tune.n_trials"] == "0" and settings["train.lr"] == "0.00123"
    assert settings["train.filters"] == "32" and settings["train.architecture"] == '"small_cnn"'
    with pytest.raises(UserError, match="lacks train.architecture, train.lr"):
        champion_settings(params, {})
