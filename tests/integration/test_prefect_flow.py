"""The Prefect flow runs the same stage functions as `dvc repro`, end to end on real slices."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from conftest import FIXTURE_SLICES, REPO

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    # One temporary Prefect API + database for the session (it takes ~17 s to start).
    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_pipeline_flow_on_fixture_slices(prefect_server, tmp_path, monkeypatch):
    from flows.pipeline_flow import pipeline_flow

    shutil.copytree(REPO / "expectations", tmp_path / "expectations")
    params = {
        "data": {"source": str(FIXTURE_SLICES)},
        "validate": {"min_images_per_class": 5},
        "split": {"train": 0.5, "val": 0.25, "test": 0.25},
        "preprocess": {"image_size": 32},
        "train": {"epochs": 2, "batch_size": 8},
        "evaluate": {"fail_on_degenerate": False},  # two epochs on 16 slices: mechanics only
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    summaries = pipeline_flow(params_path="params.yaml")
    assert [s.split(":")[0] for s in summaries] == [
        "ingest", "manifest", "validation passed", "split", "preprocess", "train", "evaluate"]
    assert not (tmp_path / "data" / "phantom").exists()
    assert json.loads((tmp_path / "reports" / "split.json").read_text())["cross_split_leaks"] == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics["recall"]) == {"Cyst", "Normal", "Stone", "Tumor"} and metrics["n_test"] >= 4
