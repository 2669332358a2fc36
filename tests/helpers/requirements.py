"""What a test needs from outside the project (the real slices in ../shared, PostgreSQL, a browser,
JAX): in a user's clone a test without it skips and says what it needs; under CI (CI=true), where
.ci/run installs everything, the same test fails instead, so a missing tool never hides as a skip.

``needs(check, reason, *marks)`` returns a ``pytest.mark.needs`` mark (plus ``marks``, e.g.
``pytest.mark.postgres``); the root conftest evaluates ``check`` once, when a test that carries it
is about to run, never at import.
"""

from __future__ import annotations

import functools
import os
import shutil
from collections.abc import Callable
from importlib.util import find_spec
from pathlib import Path

import pytest

from helpers.paths import REPO, SAMPLE

POSTGRES_URI = "postgresql://root@127.0.0.1:5432/test"
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def needs(check: Callable[[], bool], reason: str, *marks: pytest.MarkDecorator):
    """A decorator: the ``needs`` mark (checked before the test runs) and ``marks``."""
    cached = functools.cache(check)

    def decorate(test):
        for mark in (pytest.mark.needs(check=cached, reason=reason), *marks):
            test = mark(test)
        return test

    return decorate


def postgres_up() -> bool:
    try:
        import psycopg

        psycopg.connect(POSTGRES_URI, connect_timeout=3).close()
        return True
    except Exception:
        return False


def postgres_schema_uri(schema: str) -> str:
    """The test database with its own schema: Optuna and MLflow must not share one (both keep an
    alembic_version table), and parallel test runs should not see each other's tables."""
    return f"{POSTGRES_URI}?options=-csearch_path%3D{schema}"


def drop_schema(schema: str) -> None:
    """Remove a test's PostgreSQL schema and everything in it."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(POSTGRES_URI)
    with engine.connect() as connection:
        connection.execute(sqlalchemy.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        connection.commit()
    engine.dispose()


needs_sample = needs(SAMPLE.is_dir, f"needs the real slices in {SAMPLE} (../shared/data: present in CI, absent in a "
                     "user's clone)", pytest.mark.shared)
# One xdist worker runs every PostgreSQL test: MLflow's and Optuna's schema migrations must not race.
needs_postgres = needs(postgres_up, f"needs PostgreSQL at {POSTGRES_URI}", pytest.mark.postgres,
                       pytest.mark.xdist_group("postgres"))
needs_chromium = needs(lambda: CHROMIUM.is_file() and CHROMEDRIVER.is_file(),
                       "needs Debian's chromium and chromium-driver: make test-deps (apt-get install chromium "
                       "chromium-driver)", pytest.mark.browser)
needs_jax = needs(lambda: find_spec("jax") is not None, "needs jax (a dev dependency: make install)")
def uv_directory() -> str | None:
    """BentoML's build runs uv: the project's own (on PATH, or bootstrapped by make into .tools/bin)."""
    bootstrapped = REPO / ".tools" / "bin" / "uv"
    found = shutil.which("uv") or (str(bootstrapped) if bootstrapped.exists() else None)
    return str(Path(found).parent) if found else None


needs_uv = needs(lambda: uv_directory() is not None, "bentoml build needs uv (make install bootstraps it into .tools/bin)")
