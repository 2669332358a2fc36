"""`make clean` removes the pipeline's outputs and never a user's data."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from helpers.paths import REPO
from tumorscope.config import load_params
from tumorscope.workspace import clean


def _project(root: Path, source: str) -> Path:
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(REPO / name, root / name)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["source"] = source
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    (root / ".dvc").mkdir()
    (root / ".dvc" / "config").write_text("[core]\n    no_scm = true\n")
    for path in ("data/raw/Cyst/a.png", "data/cache/train_x.npy", "models/model.keras", "models/baseline/model.keras",
                 "metrics.json", "reports/leaderboard.json", "mlflow.db", "optuna.db", "mlartifacts/1/x"):
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(b"x")
    return root


def test_clean_removes_outputs_and_keeps_stores_and_a_source_inside_data(tmp_path):
    project = _project(tmp_path, "data/my-scans")
    (project / "data" / "my-scans" / "Tumor").mkdir(parents=True)
    (project / "data" / "my-scans" / "Tumor" / "t.png").write_bytes(b"scan")
    removed = clean(load_params(project / "params.yaml"), project)
    assert {p.relative_to(project).as_posix() for p in removed} >= {"data/raw", "data/cache", "models/model.keras",
                                                                     "models/baseline", "metrics.json"}
    assert (project / "data" / "my-scans" / "Tumor" / "t.png").read_bytes() == b"scan"
    assert all((project / store).exists() for store in ("mlflow.db", "optuna.db", "mlartifacts"))


def test_clean_stores_removes_the_stores_together(tmp_path):
    project = _project(tmp_path, "data/phantom")
    clean(load_params(project / "params.yaml"), project, stores=True)
    assert not any((project / store).exists() for store in ("mlflow.db", "optuna.db", "mlartifacts"))


def test_clean_never_removes_a_folder_that_holds_the_source(tmp_path):
    """A source the user placed inside an output folder (ingest refuses it; clean must not delete it)."""
    project = _project(tmp_path, "data/raw/mine")
    (project / "data" / "raw" / "mine").mkdir(parents=True)
    (project / "data" / "raw" / "mine" / "t.png").write_bytes(b"scan")
    removed = {p.relative_to(project).as_posix() for p in clean(load_params(project / "params.yaml"), project)}
    assert (project / "data" / "raw" / "mine" / "t.png").read_bytes() == b"scan"
    assert "data/raw" not in removed and "data/cache" in removed
