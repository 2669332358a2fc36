"""Session-wide projects and servers for the integration tests, each started once and shared: the
prepared fixture-slice project, the Bento service on two tiny registered models, a Prefect server,
and one tiny `dvc repro` of the whole pipeline."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import bento
from helpers.processes import stop
from helpers.projects import TINY_PROMOTED, git, make_project, prepare_data, run_tool, tiny_project_params, tracked_outputs
from helpers.servers import PrefectServer, start_prefect_server


@pytest.fixture(scope="session")
def prepared_project(tmp_path_factory) -> Path:
    """A project folder whose data stages already ran on the fixture slices (cache at 32 px)."""
    return prepare_data(tmp_path_factory.mktemp("prepared"), tiny_project_params())


@pytest.fixture
def project(prepared_project: Path, tmp_path: Path, monkeypatch) -> Path:
    """A private copy of the prepared project, as the working directory."""
    copy = tmp_path / "project"
    shutil.copytree(prepared_project, copy)
    monkeypatch.chdir(copy)
    return copy


@pytest.fixture(scope="session")
def served(prepared_project: Path, tmp_path_factory):
    """The session's `bentoml serve` (helpers/bento.py): every service, fuzz, page and Bento test calls it."""
    server = bento.serve_tiny_models(prepared_project, tmp_path_factory.mktemp("served"))
    yield server
    stop(server.process)


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory) -> PrefectServer:
    """One real Prefect server (temporary database) for every test that deploys or runs flows on one."""
    server = start_prefect_server(tmp_path_factory.mktemp("prefect"))
    yield server
    stop(server.process)


@dataclass
class DvcRun:
    project: Path                # a git + DVC project after its first `dvc repro` (copy it before changing it)
    changes: dict                # its params over params.yaml
    outputs: dict[str, bytes]    # what a second fresh run must repeat byte for byte
    stdout: str


@pytest.fixture(scope="session")
def tiny_dvc_run(tmp_path_factory, prefect_server: PrefectServer) -> DvcRun:
    """One real `dvc repro` of the whole pipeline on 100 phantom slices (its tune stage on the
    session's Prefect server), committed; shared by the repro, deployment and closed-loop tests."""
    project = make_project(tmp_path_factory.mktemp("tiny-dvc") / "project", TINY_PROMOTED)
    first = run_tool(["dvc", "repro"], project, **prefect_server.env())
    outputs = tracked_outputs(project)
    git(["add", "-A"], project)
    git(["commit", "-q", "-m", "first run"], project)
    return DvcRun(project, TINY_PROMOTED, outputs, first.stdout)
