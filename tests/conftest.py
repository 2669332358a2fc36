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
