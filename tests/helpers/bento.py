"""A real ``bentoml serve serving.service:TumorScope`` on two tiny registered models, shared by every
test that calls the service (the ``served`` fixture of tests/integration/conftest.py): started once
per test session, on a free loopback port, stopped at the end of the session.

The project is a copy of the ``prepared_project`` fixture (data stages already ran on the fixture
slices at 32 px). Two models are trained on it (2 epochs, seeds 42 and 7), logged to an SQLite
MLflow store inside the project and registered: version 1 is the champion, version 2 is there for
the reload test. Every path in its params.yaml is absolute, since the server's workers run in the
repository (``--working-dir``), not in the project.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from helpers.paths import REPO
from helpers.processes import answers_200, free_port, stop, wait_until
from helpers.processes import start as start_process

SERVICE = "serving.service:TumorScope"
READY_TIMEOUT_S = 180  # a cold start measured 31-55 s on 2 busy cores; leave room for a slow CI machine
MAX_UPLOAD_BYTES = 256 * 1024  # small, so that "just over the limit" is cheap to send
MAX_BATCH_FILES = 8


@dataclass
class Served:
    url: str
    project: Path
    params_path: Path
    registered_model: str
    versions: dict[int, dict]  # registered version -> train.json
    start_seconds: float
    log_path: Path
    inference_log: Path
    process: subprocess.Popen

    def log_tail(self, n: int = 60) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines() if self.log_path.exists() else []
        return "\n".join(lines[-n:])


def serve_params(project: Path) -> dict:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["mlflow"] |= {"tracking_uri": f"sqlite:///{project / 'mlflow.db'}", "artifact_root": str(project / "mlartifacts"),
                        "experiment": "serving-test"}
    # max_latency_ms is generous: the dispatcher sheds requests (503) it expects to finish later than
    # this, and its estimate grows on a saturated 2-core machine (two test workers: a burst of 32 was
    # shed at 2000 ms); batching is proven by batch sizes, not by latency.
    params["serve"] |= {"max_upload_bytes": MAX_UPLOAD_BYTES, "max_batch_files": MAX_BATCH_FILES, "max_batch_size": 16,
                       "max_latency_ms": 10000, "inference_log": str(project / "logs" / "inference.jsonl"),
                       "embedding_dims": 8}
    params["review"] |= {"queue_dir": str(project / "review")}  # the server runs in the repository (--working-dir)
    return params


def train_and_register(project: Path) -> dict[int, dict]:
    """Two models trained on the project's cache, registered as versions 1 (champion) and 2."""
    from tumorscope import registry
    from tumorscope.config import load_params, with_overrides
    from tumorscope.stages.training import train_and_save

    here = os.getcwd()
    os.chdir(project)
    try:
        params = load_params("params.yaml")
        versions = {}
        for seed, folder in ((42, "models"), (7, "models-2")):
            train_and_save(with_overrides(params, {"seed": seed}), project / folder, run_name=f"serving-test-{seed}",
                           parent_run_id=None, trained=f"serving test seed {seed}")
            report = json.loads((project / folder / "train.json").read_text())
            version = registry.register(params.promote.registered_model, report["model_uri"], report["run_id"], {})
            versions[int(version.version)] = report
        registry.make_champion(params.promote.registered_model, "1", "serving test")
    finally:
        os.chdir(here)
    return versions


def bentoml_command() -> list[str]:
    script = Path(sys.executable).with_name("bentoml")
    return [str(script)] if script.exists() else [sys.executable, "-m", "bentoml"]


def start(project: Path, versions: dict[int, dict], registered_model: str, params_path: Path | None = None,
          extra_env: dict[str, str] | None = None, name: str = "server") -> Served:
    """Serve ``project``'s champion with ``params_path`` (default: its params.yaml); the log is
    ``<project>/<name>.log``."""
    port = free_port()
    params_path = params_path or project / "params.yaml"
    log_path = project / f"{name}.log"
    env = os.environ | {"TUMORSCOPE_PARAMS": str(params_path), "BENTOML_HOME": str(project / "bentoml-home"),
                        "BENTOML_DO_NOT_TRACK": "True", "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1",
                        **(extra_env or {})}
    command = [*bentoml_command(), "serve", SERVICE, "--host", "127.0.0.1", "--port", str(port),
               "--working-dir", str(REPO)]
    started = time.monotonic()
    process = start_process(command, log_path, env, cwd=project)  # its workers stop with it
    inference_log = Path(yaml.safe_load(params_path.read_text())["serve"]["inference_log"])
    served = Served(f"http://127.0.0.1:{port}", project, params_path, registered_model, versions, 0.0, log_path,
                    inference_log, process)
    wait_ready(served, started)
    served.start_seconds = time.monotonic() - started
    return served


def wait_ready(served: Served, started: float) -> None:
    try:
        wait_until(answers_200(f"{served.url}/readyz"), READY_TIMEOUT_S - (time.monotonic() - started), "bentoml serve",
                   served.process, served.log_path)
    except BaseException:
        stop(served.process)
        raise


def serve_tiny_models(prepared_project: Path, root: Path) -> Served:
    """Train and register two tiny models in a copy of ``prepared_project`` under ``root``, and serve
    the champion; stop it with ``stop(served.process)``."""
    project = root / "project"
    shutil.copytree(prepared_project, project)
    params = serve_params(project)
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    versions = train_and_register(project)
    from tumorscope.config import parse_params

    served = start(project, versions, parse_params(params).promote.registered_model)
    print(f"\nbentoml serve ready after {served.start_seconds:.1f} s")
    return served


def logged_records(inference_log: Path, request_ids: list[str], seconds: float = 10) -> dict[str, dict]:
    """The inference log's records by request id, once every one of ``request_ids`` is in it (the
    service writes from a background thread)."""
    def read() -> dict[str, dict]:
        lines = inference_log.read_text().splitlines() if inference_log.exists() else []
        return {record["request_id"]: record for record in map(json.loads, lines)}

    deadline = time.monotonic() + seconds
    logged = read()
    while time.monotonic() < deadline and not all(r in logged for r in request_ids):
        time.sleep(0.1)
        logged = read()
    missing = [r for r in request_ids if r not in logged]
    assert not missing, f"not in {inference_log} after {seconds:g} s: {missing}"
    return logged


def requirement_pins(text: str) -> set[str]:
    """The requirement lines of a requirements file, markers normalised (BentoML rewrites their quotes)."""
    from packaging.requirements import Requirement

    return {str(Requirement(line.split("#")[0])) for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")}
