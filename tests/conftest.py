"""Root fixtures and hooks: environment defaults, the ``needs`` mark (skip in a user's clone, fail
under CI), and the tiny data sets every folder uses. Helpers live in tests/helpers/."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from helpers.images import textured_slice, write_png
from helpers.requirements import in_ci
from tumorscope.runtime import apply_cpu_defaults

apply_cpu_defaults()  # before any test imports TensorFlow
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
# A developer's own API keys would lock the test servers: the tests that want keys set their own.
for _name in ("TUMORSCOPE_API_KEYS", "TUMORSCOPE_ADMIN_KEYS"):
    os.environ.pop(_name, None)


def pytest_runtest_setup(item: pytest.Item) -> None:
    """A test whose ``needs`` check is false skips, saying what it needs; under CI it fails."""
    for mark in item.iter_markers("needs"):
        if not mark.kwargs["check"]():
            reason = mark.kwargs["reason"]
            if in_ci():
                pytest.fail(f"CI must provide this (.ci/run installs it): {reason}", pytrace=False)
            pytest.skip(reason)


@pytest.fixture
def class_folders(tmp_path: Path) -> Path:
    """A class-per-folder set: 3 classes x 12 distinct textured PNGs."""
    rng = np.random.default_rng(0)
    root = tmp_path / "dataset"
    for label in ("Cyst", "Normal", "Tumor"):
        for i in range(12):
            write_png(root / label / f"{label}- ({i}).png", textured_slice(rng))
    return root
