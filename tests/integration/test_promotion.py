"""Promotion through the real MLflow registry: the first model that passes the absolute gates becomes
champion, a better one replaces it, a worse one is refused with the failed gates named, rollback
restores the previous champion with a record of who, when and why; on SQLite and PostgreSQL.

The data is generated so that a small CNN learns it in seconds (the class is the brightness band of
a textured slice): what is tested is the promotion's mechanics and its statistics, not learning.
A "worse" model is a real Keras model of the same architecture whose head always answers one
class, logged and evaluated through the same code as any trained model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from helpers.images import not_ct_images, textured_slice, write_png
from helpers.params import raw_params_with
from helpers.paths import REPO
from helpers.requirements import drop_schema, needs_postgres, postgres_schema_uri
from tumorscope.config import load_params, with_overrides
from tumorscope.stages import data as data_stages
from tumorscope.stages import prediction, promotion, training

pytestmark = pytest.mark.slow
CLASSES = ("Cyst", "Normal", "Tumor")


def brightness_classes(root: Path, per_class: int = 40, size: int = 32) -> Path:
    """Distinct textured slices whose class is their brightness band (learnable in a few epochs)."""
    rng = np.random.default_rng(7)
    for index, label in enumerate(CLASSES):
        for i in range(per_class):
            texture = textured_slice(rng, size).astype(np.float64) / 255.0
            pixels = np.clip(20 + index * 80 + texture * 60, 0, 255).astype(np.uint8)
            write_png(root / label / f"{label}-{i}.png", pixels)
    return root


def project_params(root: Path, tracking_uri: str) -> dict:
    return {
        "data": {"source": str(brightness_classes(root / "source"))},
        "validate": {"min_images_per_class": 5},
        "split": {"train": 0.5, "val": 0.2, "test": 0.3},
        "preprocess": {"image_size": 32},
        "train": {"epochs": 12, "batch_size": 16, "lr": 0.003, "warmup_epochs": 3, "patience": 6},
        "evaluate": {"fail_on_degenerate": False, "max_single_class_share": 1.0, "bootstrap_samples": 300},
        "promote": {"min_macro_f1_low": 0.0, "min_critical_recall_low": 0.0, "max_ece": 1.0,
                    "require_beating_acquisition_baselines": False},
        "mlflow": {"tracking_uri": tracking_uri, "artifact_root": str(root / "mlartifacts")},
    }


def make_project(root: Path, tracking_uri: str):
    root.mkdir(parents=True, exist_ok=True)
    shutil.copytree(REPO / "expectations", root / "expectations")
    (root / "params.yaml").write_text(yaml.safe_dump(raw_params_with(project_params(root, tracking_uri))))
    params = load_params(root / "params.yaml")
    for stage in data_stages.DATA_STAGES[1:]:
        getattr(data_stages, f"run_{stage}")(params)
    return params


def constant_model(params, source_dir: Path, target_dir: Path, answer: str) -> None:
    """Copy a trained model whose head always answers ``answer``; log it to MLflow like training does."""
    import keras

    from tumorscope import registry, tracking
    from tumorscope.data.preprocess import load_split
    from tumorscope.models.saving import save_model
    from tumorscope.reports import read_json, write_json

    summary = read_json(source_dir / "train.json")
    model = keras.saving.load_model(source_dir / "model.keras")
    head = model.layers[-1]
    kernel, bias = head.get_weights()
    bias = np.full_like(bias, -10.0)
    bias[summary["classes"].index(answer)] = 10.0
    head.set_weights([np.zeros_like(kernel), bias])
    experiment_id = tracking.configure(params.mlflow)
    with tracking.start_training_run(params, experiment_id, f"constant-{answer}", "train") as run:
        uri = registry.log_model(model, summary["input_spec"], load_split(params.preprocess.cache_dir, "val")[0][:2])
    save_model(model, target_dir)
    write_json(target_dir / "train.json", summary | {"run_id": run.info.run_id, "model_uri": uri})


def evaluate_and_promote(params, model_dir: Path) -> tuple[str, dict]:
    params = with_overrides(params, {"train": {"model_dir": str(model_dir)}})
    training.run_evaluate(params)
    line = promotion.run_promote(params)
    return line, json.loads(Path(params.promote.report_path).read_text())


def champion_version(params) -> str:
    import mlflow

    return str(mlflow.MlflowClient().get_model_version_by_alias(params.promote.registered_model, "champion").version)


def test_gates_aliases_and_rollback(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.chdir(tmp_path)
    params = make_project(tmp_path, f"sqlite:///{tmp_path / 'mlflow.db'}")
    training.train_and_save(params, Path("models/good"), "good", None, "test: learns the brightness bands")
    constant_model(params, Path("models/good"), Path("models/always-cyst"), "Cyst")
    constant_model(params, Path("models/good"), Path("models/always-normal"), "Normal")

    # The first model that passes the absolute gates becomes champion, even a poor one.
    line, report = evaluate_and_promote(params, Path("models/always-cyst"))
    assert report["promoted"] and report["champion_version_before"] is None
    assert line.startswith("promote: tumorscope-kidney-ct/1 is the new champion;")
    assert champion_version(params) == "1"

    # A better model replaces it: the paired interval of the macro-F1 difference lies above 0.
    line, report = evaluate_and_promote(params, Path("models/good"))
    assert report["promoted"], line
    assert report["comparison"]["low"] > 0 and report["comparison"]["mcnemar"]["a_only"] > 0
    assert champion_version(params) == "2"

    # A worse one is refused, the failed gate named first, and the champion stays.
    line, report = evaluate_and_promote(params, Path("models/always-normal"))
    assert not report["promoted"]
    assert line.startswith("promote: tumorscope-kidney-ct/3 refused (beats_champion) against champion tumorscope-kidney-ct/2;")
    failed = [g["name"] for g in report["gates"] if not g["passed"]]
    assert failed == ["beats_champion"]
    assert report["comparison"]["high"] < 0
    client = mlflow.MlflowClient()
    assert champion_version(params) == "2"
    assert str(client.get_model_version_by_alias(params.promote.registered_model, "challenger").version) == "3"
    run = client.get_run(client.get_model_version(params.promote.registered_model, "3").run_id)
    assert run.data.tags["promotion"] == "refused" and run.data.metrics["promote_gate_beats_champion"] == 0.0

    # The same evaluated model again: nothing to decide, no new version.
    again = evaluate_and_promote(params, Path("models/good"))[0]
    assert again == "promote: tumorscope-kidney-ct/2 is already the champion; nothing to decide"

    # Rollback restores the previous champion, with who/when/why on the registry.
    monkeypatch.setenv("TUMORSCOPE_USER", "dr-test")
    assert promotion.run_rollback(params, "tumour misses reported by ward 3") == (
        "rollback: tumorscope-kidney-ct champion 2 -> 1 by dr-test: tumour misses reported by ward 3")
    assert champion_version(params) == "1"
    record = json.loads(client.get_model_version(params.promote.registered_model, "2").tags["rolled_back"])
    assert record["by"] == "dr-test" and record["reason"] == "tumour misses reported by ward 3" and record["at"]
    with pytest.raises(Exception, match="only champion there has been"):
        promotion.run_rollback(params, "again")

    # Rerunning the promotion of the rolled-back model does not undo the person's decision.
    line, report = evaluate_and_promote(params, Path("models/good"))
    assert not report["promoted"] and "refused (not_rolled_back)" in line and "dr-test" in line
    assert champion_version(params) == "1"
    # An alias names a version too; "challenger" is version 2 again after that rerun.
    assert promotion.run_rollback(params, "back to the newer one", "challenger").endswith("champion 1 -> 2 by dr-test: "
                                                                                          "back to the newer one")


def test_predict_writes_csv_and_external_validation(tmp_path, monkeypatch):
    """`tumorscope predict` on a labelled folder: one row per file (an unreadable one kept, with its
    reason), the cache's pixels (same probabilities as the model on the cache), and an external
    validation report logged to the model's run."""
    import mlflow
    import pandas as pd

    from tumorscope.data.preprocess import load_split
    from tumorscope.data.split import read_split_table
    from tumorscope.inference import load_model_dir
    from tumorscope.trust.calibration import apply_temperature

    monkeypatch.chdir(tmp_path)
    params = make_project(tmp_path, f"sqlite:///{tmp_path / 'mlflow.db'}")
    training.train_and_save(params, Path("models"), "good", None, "test")
    table = read_split_table(params.split.path)
    test_rows = table[table["split"] == "test"]
    external = tmp_path / "hospital"
    for path, label in zip(test_rows["path"], test_rows["label"], strict=True):
        (external / label).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, external / label / Path(path).name)
    (external / "Tumor" / "notes.txt").write_text("not an image")

    line = prediction.run_predict(params, [external], model="models", out=tmp_path / "out" / "hospital.csv")
    assert f"predict: {len(test_rows)} of {len(test_rows) + 1} images" in line and "1 unreadable" in line
    assert "external validation on" in line
    csv = pd.read_csv(tmp_path / "out" / "hospital.csv", keep_default_na=False)
    assert len(csv) == len(test_rows) + 1
    bad = csv[csv["path"].str.endswith("notes.txt")].iloc[0]
    assert bad["predicted"] == "" and "not an image" in bad["error"]

    # Same pixels as the cache: the CSV's probabilities equal the model's on the cached test split.
    model = load_model_dir("models")
    images, labels = load_split(params.preprocess.cache_dir, "test")
    cached = model.predict_proba(images)
    by_name = {Path(p).name: i for i, p in enumerate(test_rows["path"])}
    good = csv[csv["error"] == ""]
    order = [by_name[Path(p).name] for p in good["path"]]
    np.testing.assert_allclose(good[[f"raw_p_{c}" for c in model.classes]].to_numpy(float), cached[order], atol=1e-6)
    # p_<class> are the calibrated probabilities; every answer says whether to refer it and why.
    calibrated = apply_temperature(cached[order], model.trust["temperature"])
    np.testing.assert_allclose(good[[f"p_{c}" for c in model.classes]].to_numpy(float), calibrated, atol=1e-5)
    assert set(good["refer"].astype(str)) <= {"True", "False"} and (good["ood_distance"].astype(float) >= 0).all()
    assert set(good["orientation"]) <= {"axial", "coronal", "other"}  # every answer names the slice's plane
    referred = good[good["refer"].astype(str) == "True"]
    assert (referred["refer_reason"] != "").all() and (good[good["refer"].astype(str) == "False"]["refer_reason"] == "").all()
    kept = good[good["refer"].astype(str) == "False"]
    assert (kept["prediction_set"] == kept["predicted"]).all()  # a decided answer is a set of one: its class
    assert "referred to a radiologist" in line

    report = json.loads((tmp_path / "out" / "hospital_validation.json").read_text())
    assert report["n"] == len(test_rows) and report["n_unreadable"] == 1
    assert report["accuracy_by_train_distance"] is not None  # same split table as training
    run = mlflow.get_run(json.loads(Path("models/train.json").read_text())["run_id"])
    assert run.data.metrics["external_macro_f1"] == pytest.approx(report["macro_f1"])
    assert 0 <= report["trust"]["conformal"]["coverage"]["value"] <= 1 and "prediction sets cover" in line

    # Images no radiologist would send are referred with the reason, never given a confident class.
    odd = tmp_path / "odd"
    odd.mkdir()
    for name, pixels in not_ct_images(64).items():
        Image.fromarray(pixels.astype(np.uint8)).save(odd / name)
    prediction.run_predict(params, [odd], model="models", out=tmp_path / "out" / "odd.csv")
    odd_csv = pd.read_csv(tmp_path / "out" / "odd.csv", keep_default_na=False).set_index("path")
    assert (odd_csv["refer"].astype(str) == "True").all(), odd_csv[["refer", "refer_reason"]]
    for name in ("white.png", "black.png", "grey.png"):
        assert odd_csv.loc[str(odd / name), "refer_reason"].startswith("blank or constant image")
        assert str(odd_csv.loc[str(odd / name), "ood"]) == "True"


@needs_postgres
def test_registry_on_postgres(tmp_path, monkeypatch):
    """Register, promote and roll back on a PostgreSQL tracking store (parallel workers' set-up)."""
    schema = f"tumorscope_registry_{tmp_path.name[-12:].replace('-', '_').lower()}"
    monkeypatch.chdir(tmp_path)
    params = make_project(tmp_path, postgres_schema_uri(schema))
    try:
        training.train_and_save(with_overrides(params, {"train": {"epochs": 2}}), Path("models/a"), "a", None, "test")
        constant_model(params, Path("models/a"), Path("models/b"), "Cyst")
        assert evaluate_and_promote(params, Path("models/a"))[1]["promoted"]
        promote = with_overrides(params, {"promote": {"min_improvement": -1.0}})  # accept anything not absurd
        line, report = evaluate_and_promote(promote, Path("models/b"))
        assert report["promoted"], line
        assert champion_version(params) == "2"
        assert promotion.run_rollback(params, "postgres check").endswith("champion 2 -> 1 by " + __import__(
            "tumorscope.registry", fromlist=["actor"]).actor() + ": postgres check")
    finally:
        drop_schema(schema)
