"""Where things are: the repository, the real slices shipped with the tests, ../shared/data."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO.parent / "shared" / "data"
SAMPLE = SHARED_DATA / "kidney-ct-sample"
FIXTURE_SLICES = REPO / "tests" / "fixtures" / "kidney-ct-mini"
BIN = Path(sys.executable).parent  # the environment's scripts: dvc, prefect, bentoml, tumorscope
