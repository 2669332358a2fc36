"""Shared fixtures: tiny generated data sets and paths to the real slices."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
SAMPLE = SHARED_DATA / "kidney-ct-sample"
FIXTURE_SLICES = REPO / "tests" / "fixtures" / "kidney-ct-mini"

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

needs_sample = pytest.mark.skipif(
    not SAMPLE.is_dir(),
    reason=f"needs the real slices in {SAMPLE} (../shared/data, present in CI, absent in a user's clone)",
)


def write_png(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def textured_slice(rng: np.random.Generator, size: int = 48) -> np.ndarray:
    """A random, non-blank greyscale image whose perceptual hash differs from other draws."""
    coarse = rng.integers(0, 256, (6, 6), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC))


@pytest.fixture
def class_folders(tmp_path: Path) -> Path:
    """A class-per-folder set: 3 classes x 12 distinct textured PNGs."""
    rng = np.random.default_rng(0)
    root = tmp_path / "dataset"
    for label in ("Cyst", "Normal", "Tumor"):
        for i in range(12):
            write_png(root / label / f"{label}- ({i}).png", textured_slice(rng))
    return root


POSTGRES_URI = "postgresql://root@127.0.0.1:5432/test"


def postgres_schema_uri(schema: str) -> str:
    """The test database with its own schema: Optuna and MLflow must not share one (both keep an
    alembic_version table), and parallel test runs should not see each other's tables."""
    return f"{POSTGRES_URI}?options=-csearch_path%3D{schema}"


def postgres_up() -> bool:
    try:
        import psycopg

        psycopg.connect(POSTGRES_URI, connect_timeout=3).close()
        return True
    except Exception:
        return False


needs_postgres = pytest.mark.skipif(not postgres_up(), reason=f"needs PostgreSQL at {POSTGRES_URI}")


def tiny_project_params(source: Path) -> dict:
    """params.yaml overrides for a seconds-long run on the 32 fixture slices (mechanics, not accuracy)."""
    return {
        "data": {"source": str(source)},
        "validate": {"min_images_per_class": 5},
        "split": {"train": 0.5, "val": 0.25, "test": 0.25},
        "preprocess": {"image_size": 32},
        "train": {"epochs": 2, "batch_size": 8, "patience": 5},
        "evaluate": {"fail_on_degenerate": False, "bootstrap_samples": 200},
        "tune": {"n_trials": 3, "trial_epochs": 2, "min_critical_recall": 0.0, "pruner_warmup_epochs": 1,
                 "heartbeat_seconds": 2,
                 "search_space": {"architecture": ["small_cnn"], "lr": {"low": 0.0005, "high": 0.005, "log": True},
                                  "filters": [8, 16]}},
    }


@pytest.fixture(scope="session")
def prepared_project(tmp_path_factory) -> Path:
    """A project folder whose data stages already ran on the fixture slices (cache at 32 px)."""
    import shutil

    import yaml

    from tumorscope.config import load_params
    from tumorscope.stages import data as stages

    root = tmp_path_factory.mktemp("prepared")
    shutil.copytree(REPO / "expectations", root / "expectations")
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_project_params(FIXTURE_SLICES)))
    here = os.getcwd()
    os.chdir(root)
    try:
        params = load_params("params.yaml")
        for stage in stages.DATA_STAGES[1:]:
            getattr(stages, f"run_{stage}")(params)
    finally:
        os.chdir(here)
    return root


@pytest.fixture
def project(prepared_project: Path, tmp_path: Path, monkeypatch) -> Path:
    """A private copy of the prepared project, as the working directory."""
    import shutil

    copy = tmp_path / "project"
    shutil.copytree(prepared_project, copy)
    monkeypatch.chdir(copy)
    return copy
