"""User mistakes end with one line on stderr, exit code 1, no traceback, and nothing lost."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

from helpers.images import textured_slice, write_png
from helpers.params import raw_params_with
from helpers.paths import REPO


def tumorscope(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tumorscope.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def _project(tmp_path: Path, params: dict) -> Path:
    """A project whose params.yaml is the project's with ``params`` merged in."""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw_params_with(params)))
    return tmp_path


def _assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_help_lists_every_stage(tmp_path):
    result = tumorscope("--help", cwd=tmp_path)
    assert result.returncode == 0
    for command in ("preprocess", "train", "evaluate", "promote", "rollback", "predict"):
        assert command in result.stdout


def test_help_imports_no_heavy_library(tmp_path):
    code = ("import sys; from typer.testing import CliRunner; from tumorscope.cli import app; "
            "CliRunner().invoke(app, ['--help']); "
            "print(sorted(m for m in ('tensorflow','keras','mlflow','great_expectations','dvc') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert out.stdout.strip() == "[]", out.stderr


def test_missing_source(tmp_path):
    result = tumorscope("ingest", cwd=_project(tmp_path, {"data": {"source": str(tmp_path / "nowhere")}}))
    _assert_one_line_error(result, "data.source", "nowhere")


def test_invalid_params_value_names_key(tmp_path):
    result = tumorscope("split", cwd=_project(tmp_path, {"split": {"phash_threshold": 99}}))
    _assert_one_line_error(result, "split.phash_threshold")


def test_missing_params_file(tmp_path):
    _assert_one_line_error(tumorscope("ingest", cwd=tmp_path), "params file not found")


def test_unknown_class_in_class_map(tmp_path, class_folders):
    params = {"data": {"source": str(class_folders), "class_map": {"Kidney-Stone": "Stone"}}}
    _assert_one_line_error(tumorscope("ingest", cwd=_project(tmp_path, params)), "Kidney-Stone")


def test_empty_class_folder(tmp_path, class_folders):
    (class_folders / "Stone").mkdir()
    params = {"data": {"source": str(class_folders)}}
    _assert_one_line_error(tumorscope("ingest", cwd=_project(tmp_path, params)), "empty", "Stone")


def test_class_of_corrupt_files_keeps_quarantine_report(tmp_path, class_folders):
    (class_folders / "Stone").mkdir()
    (class_folders / "Stone" / "a.jpg").write_bytes(b"not a jpeg")
    write_png(class_folders / "Cyst" / "extra.png", textured_slice(np.random.default_rng(9)))
    project = _project(tmp_path, {"data": {"source": str(class_folders)}})
    assert tumorscope("ingest", cwd=project).returncode == 0
    result = tumorscope("manifest", cwd=project)
    _assert_one_line_error(result, "class 'Stone' has no readable image")
    quarantine = (project / "reports" / "quarantine.csv").read_text()
    assert "a.jpg" in quarantine and "not an image" in quarantine
    assert (project / "data" / "manifest.csv").read_text().count("\n") == 12 * 3 + 2 + 1


def test_non_image_files_are_quarantined_with_a_warning_line(tmp_path, class_folders):
    (class_folders / "Normal" / "Thumbs.db").write_bytes(b"\x00\x01")
    project = _project(tmp_path, {"data": {"source": str(class_folders)}})
    assert tumorscope("ingest", cwd=project).returncode == 0
    result = tumorscope("manifest", cwd=project)
    assert result.returncode == 0, result.stderr
    assert "1 unreadable file(s) quarantined" in result.stdout
    assert "Thumbs.db" in (project / "reports" / "quarantine.csv").read_text()


def test_a_source_inside_the_raw_folder_is_refused_and_nothing_is_deleted(tmp_path, class_folders):
    """A user who put their slices where the pipeline keeps its copy: ingest used to delete them."""
    raw = tmp_path / "data" / "raw"
    raw.parent.mkdir(parents=True)
    class_folders.rename(raw)
    before = sorted((p.relative_to(raw), p.read_bytes()) for p in raw.rglob("*") if p.is_file())
    project = _project(tmp_path, {"data": {"source": "data/raw", "raw_dir": "data/raw"}})
    _assert_one_line_error(tumorscope("ingest", cwd=project), "data.source", "data.raw_dir")
    assert sorted((p.relative_to(raw), p.read_bytes()) for p in raw.rglob("*") if p.is_file()) == before


def _mlflow_params(tmp_path: Path) -> dict:
    return {"mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "artifact_root": str(tmp_path / "mlartifacts")}}


def test_predict_a_missing_path(tmp_path):
    _project(tmp_path, _mlflow_params(tmp_path))
    (tmp_path / "models").mkdir()
    _assert_one_line_error(tumorscope("predict", "no/such/folder", cwd=tmp_path), "predict: not found: no/such/folder")
    (tmp_path / "scans").mkdir()
    _assert_one_line_error(tumorscope("predict", "scans", "--model", "models", cwd=tmp_path), "models/model.keras not found")
    _assert_one_line_error(tumorscope("predict", "scans", cwd=tmp_path), "has no alias 'champion'", "tumorscope promote")


def test_promote_and_rollback_before_any_model(tmp_path):
    _project(tmp_path, _mlflow_params(tmp_path))
    _assert_one_line_error(tumorscope("promote", cwd=tmp_path), "models/train.json not found")
    _assert_one_line_error(tumorscope("rollback", "--reason", "bad batch", cwd=tmp_path), "no champion to roll back")
    _assert_one_line_error(tumorscope("rollback", "--reason", " ", cwd=tmp_path), "needs a reason")



def test_audit_crossval_and_ablate_before_the_cache_is_built(tmp_path):
    _project(tmp_path, {})
    for command in ("audit", "crossval", "ablate"):
        _assert_one_line_error(tumorscope(command, cwd=tmp_path), "data/cache has no cache: run the data stages first")


def test_a_cross_source_that_is_not_a_folder(tmp_path, class_folders):
    params = {"data": {"source": str(class_folders)}, "validate": {"min_images_per_class": 5},
              "cross_source": {"path": str(tmp_path / "nowhere")}}
    _project(tmp_path, params)
    shutil.copytree(REPO / "expectations", tmp_path / "expectations")
    for stage in ("ingest", "manifest", "validate", "split", "preprocess"):
        assert tumorscope(stage, cwd=tmp_path).returncode == 0
    _assert_one_line_error(tumorscope("crossval", cwd=tmp_path), "cross_source.path:", "is not a folder")
