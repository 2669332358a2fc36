"""`tumorscope crossval` on the fixture slices: every image tested once, by a model that never saw
its duplicate group, with one MLflow parent run and a nested run per fold."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from helpers.images import another_export
from tumorscope.config import load_params, with_overrides
from tumorscope.data.preprocess import load_cached_dataset
from tumorscope.stages import crossval as crossval_stages
from tumorscope.stages import data as data_stages
from tumorscope.tracking import absolute_sqlite_uri

pytestmark = pytest.mark.slow


def test_crossval_tests_every_image_once_and_logs_a_run_per_fold(project):
    import mlflow

    from tumorscope.data.split import grouped_folds
    from tumorscope.models.crossval import fold_roles

    params = with_overrides(load_params("params.yaml"), {"crossval": {"folds": 3}})
    line = crossval_stages.run_crossval(params)
    assert line.startswith("crossval: 3 grouped folds of 32 images (small_cnn): macro-F1 mean ")
    assert "\ncrossval: out-of-fold accuracy by pHash distance to the nearest training slice: " in line

    report = json.loads(open(params.crossval.report_path).read())
    assert [r["fold"] for r in report["rounds"]] == [0, 1, 2]
    assert sum(r["n_test"] for r in report["rounds"]) == report["n_images"] == 32
    assert all(r["n_train"] + r["n_val"] + r["n_test"] == 32 for r in report["rounds"])
    assert report["macro_f1"]["n"] == 3 and 0.0 <= report["macro_f1"]["min"] <= report["macro_f1"]["max"] <= 1.0
    assert set(report["pooled"]["recall"]) == {"Cyst", "Normal", "Stone", "Tumor"}

    bands = report["accuracy_by_train_distance"]
    assert sum(band["n"] for band in bands) == 32  # every out-of-fold prediction sits in a band
    # Duplicates within the grouping threshold share a group, hence a fold: none is that close.
    assert bands[0]["distance"] == "0-4" and bands[0]["n"] == 0 and params.split.phash_threshold == 4

    # No duplicate group is both trained on and tested in any round.
    _, labels, groups = load_cached_dataset(params.preprocess.cache_dir)
    folds = grouped_folds(labels, groups, 3, params.seed)
    for fold in range(3):
        roles = fold_roles(folds, fold, 3)
        assert not set(groups[roles["test"]]) & set(groups[roles["train"] | roles["val"]])
        assert report["rounds"][fold]["n_test"] == int(roles["test"].sum())

    mlflow.set_tracking_uri(absolute_sqlite_uri(params.mlflow.tracking_uri))
    folds_logged = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                      filter_string=f"tags.mlflow.parentRunId = '{report['mlflow_run_id']}'")
    assert sorted(run.data.tags["fold"] for run in folds_logged) == ["0", "1", "2"]
    assert all("test_macro_f1" in run.data.metrics for run in folds_logged)
    parent = mlflow.get_run(report["mlflow_run_id"])
    assert parent.data.metrics["cv_macro_f1_mean"] == pytest.approx(report["macro_f1"]["mean"])


def test_another_export_is_scored_only_on_each_folds_held_out_series(project, tmp_path):
    params = with_overrides(load_params("params.yaml"), {"crossval": {"folds": 3},
                                                         "cross_source": {"path": str(tmp_path / "export")}})
    counts = another_export(project / params.data.raw_dir, tmp_path / "export")
    line = crossval_stages.run_crossval(params)
    assert "\ncrossval: in_source: macro-F1 " in line and "\ncrossval: cross_source: macro-F1 " in line
    assert "\ncrossval: in_source: the model " in line and "the intensity baseline" in line
    report = json.loads(open(params.crossval.report_path).read())
    cross = report["cross_source"]
    assert cross["n_slices"] == sum(counts.values()) + 1 and cross["n"] == cross["scored"]
    assert cross["tied_by"]["name"] == counts["same_name"] and cross["untied"] <= 1 + counts["renamed"]
    assert cross["scored"] == cross["n_slices"] - cross["untied"] - cross["not_scored_ambiguous"] > counts["same_name"] // 2
    assert set(cross["by_orientation"]) <= {"axial", "coronal", "other"}
    assert report["acquisition_baselines"]["cross_source"]["intensity"]["model_minus_baseline"]["n_groups"] > 0
    # The referral of each fold's model, its trust state fitted on that fold's training and validation
    # slices, on both sources: the share decided, why the rest were referred, the decided accuracy.
    assert "\ncrossval: cross_source: the referral decides " in line
    for where, n in (("in_source", report["n_images"]), ("cross_source", cross["scored"])):
        referral = report["referral"][where]
        referred = round((1 - referral["decided"]["value"]) * n)
        assert referred == sum(referral["referred_because"].values()) or referral["referred_because"]["features"]
        assert 0.0 <= referral["decided"]["value"] <= 1.0

    # Every scored slice belongs to a series its fold's model never trained on.
    from tumorscope.data.preprocess import load_classes
    from tumorscope.data.split import grouped_folds
    from tumorscope.models.crossval import fold_roles

    _, labels, groups = load_cached_dataset(params.preprocess.cache_dir)
    folds = grouped_folds(labels, groups, 3, params.seed)
    held_out = crossval_stages.load_held_out(params, load_classes(params.preprocess.cache_dir), labels, groups, folds)
    scored = held_out.folds >= 0
    assert int(scored.sum()) == cross["scored"]
    for series, fold in zip(held_out.series[scored], held_out.folds[scored], strict=True):
        roles = fold_roles(folds, int(fold), 3)
        assert series in set(groups[roles["test"]]) and series not in set(groups[roles["train"] | roles["val"]])


def test_more_folds_than_groups_is_a_one_line_error(project):
    import subprocess
    import sys

    raw = yaml.safe_load(open("params.yaml"))
    raw["crossval"]["folds"] = 20
    raw["split"]["phash_threshold"] = 64  # every image one group... after a re-split
    yaml.safe_dump(raw, open("params.yaml", "w"))
    params = load_params("params.yaml")
    data_stages.run_split(params)
    data_stages.run_preprocess(params)
    _, _, groups = load_cached_dataset(params.preprocess.cache_dir)
    assert len(np.unique(groups)) < 20
    result = subprocess.run([sys.executable, "-m", "tumorscope.cli", "crossval"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("error: crossval.folds: 20 folds but only")
