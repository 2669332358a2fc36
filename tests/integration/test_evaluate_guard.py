"""`tumorscope evaluate` on a model that predicts one class: metrics written, then a loud failure."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import yaml

from helpers.params import raw_params_with, section
from tumorscope.config import ConformalConfig, OodConfig
from tumorscope.trust.answers import fit_trust


def test_constant_model_fails_evaluate_but_keeps_its_metrics(tmp_path):
    import keras
    import mlflow

    cache = tmp_path / "data" / "cache"
    cache.mkdir(parents=True)
    rng = np.random.default_rng(0)
    np.save(cache / "test_x.npy", rng.integers(0, 255, (40, 16, 16, 1), dtype=np.uint8))
    np.save(cache / "test_y.npy", np.arange(40, dtype=np.int32) % 4)
    np.save(cache / "test_groups.npy", np.arange(40) // 2)  # duplicate-group ids: pairs
    # The training slices the acquisition-only baselines are fitted on.
    np.save(cache / "train_x.npy", rng.integers(0, 255, (40, 16, 16, 1), dtype=np.uint8))
    np.save(cache / "train_y.npy", np.arange(40, dtype=np.int32) % 4)
    # A model that ignores its input: zero kernel, bias favouring class 1.
    inputs = keras.Input((16, 16, 1))
    flat = keras.layers.Flatten()(inputs)
    outputs = keras.layers.Dense(4, activation="softmax", kernel_initializer="zeros",
                                 bias_initializer=keras.initializers.Constant([0.0, 3.0, 0.0, 0.0]))(flat)
    (tmp_path / "models").mkdir()
    model = keras.Model(inputs, outputs)
    model.save(tmp_path / "models" / "model.keras")
    # Its calibration, prediction-set thresholds and OOD check, fitted as the train stage does.
    validation = (rng.integers(0, 255, (24, 16, 16, 1), dtype=np.uint8), np.arange(24) % 4, np.arange(24))
    trust = fit_trust(model, validation[:2], validation, 4, section(ConformalConfig), section(OodConfig))

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = mlflow.create_experiment("tumorscope", artifact_location=(tmp_path / "mlartifacts").as_uri())
    with mlflow.start_run(experiment_id=experiment) as run:
        pass
    (tmp_path / "models" / "train.json").write_text(json.dumps(
        {"run_id": run.info.run_id, "classes": ["Cyst", "Normal", "Stone", "Tumor"], "trust": trust}))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw_params_with({"preprocess": {"image_size": 16}})))
    classes = ["Cyst", "Normal", "Stone", "Tumor"]
    split = [{"path": f"t{i}.png", "label": classes[i % 4], "phash": f"{i:016x}", "split": "test"} for i in range(40)]
    split += [{"path": "a.png", "label": "Cyst", "phash": f"{1 << 63:016x}", "split": "train"}]
    pd.DataFrame(split).to_csv(tmp_path / "data" / "split.csv", index=False)

    result = subprocess.run([sys.executable, "-m", "tumorscope.cli", "evaluate"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "DEGENERATE MODEL" in error[0] and "100%" in error[0]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["degenerate"] is True and metrics["recall"]["Normal"] == 1.0
    # It ignores its input, so it beats no acquisition-only baseline, and the promotion gate would say so.
    assert metrics["shortcuts"]["beats_acquisition_baselines"] is False
    assert mlflow.get_run(run.info.run_id).data.tags["degenerate"] == "true"
