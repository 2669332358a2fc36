"""Servers tests share: one Prefect server for a whole test session (a temporary database in the
session's folder), and the project's MLflow tracking server."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from helpers.paths import BIN
from helpers.processes import answers_200, free_port, start, stop, wait_until

READY_TIMEOUT_S = 180  # a cold start took 20-60 s on 2 busy cores


@dataclass
class PrefectServer:
    api_url: str
    home: Path
    process: subprocess.Popen

    def env(self) -> dict[str, str]:
        """Environment variables that point Prefect clients (flows, workers, CLI) at this server."""
        return {"PREFECT_API_URL": self.api_url, "PREFECT_HOME": str(self.home),
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


def start_prefect_server(home: Path) -> PrefectServer:
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    process = start([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                    home / "server.log", env)
    try:
        wait_until(answers_200(f"{api}/health"), READY_TIMEOUT_S, "the Prefect server", process, home / "server.log")
    except BaseException:
        stop(process)
        raise
    return PrefectServer(api, home, process)


@dataclass
class MlflowServer:
    url: str
    artifacts: Path      # the server's artefact folder: no client reads or writes it directly
    log: Path
    process: subprocess.Popen


def start_mlflow_server(root: Path, backend_store_uri: str) -> MlflowServer:
    """`tumorscope mlflow-server` (the project's command) on a free loopback port: ``backend_store_uri``
    for runs and the registry, artefacts proxied from ``root``/artifacts."""
    import yaml

    from helpers.params import raw_params_with

    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump(raw_params_with({"mlflow": {"server": {
        "host": "127.0.0.1", "port": port, "workers": 1, "backend_store_uri": backend_store_uri,
        "artifacts_destination": str(root / "artifacts")}}})))
    log = root / "server.log"
    process = start([str(BIN / "tumorscope"), "mlflow-server", "--params", str(params)], log, cwd=root)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(answers_200(f"{url}/health"), READY_TIMEOUT_S, "the MLflow server", process, log)
    except BaseException:
        stop(process)
        raise
    return MlflowServer(url, root / "artifacts", log, process)
