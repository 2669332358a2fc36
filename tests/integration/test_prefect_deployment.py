"""The `train` deployment, end to end: a real Prefect server (temporary database), the deployment
served by flows/deploy.py, a run triggered with `prefect deployment run`, as a user would."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow
PREFECT = str(Path(sys.executable).with_name("prefect"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, seconds: float, what: str, process: subprocess.Popen):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"{what}: process exited {process.returncode}: {process.stdout.read()[-3000:]}")
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


def test_train_deployment_runs_on_a_real_server(project, tmp_path):
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_API_URL=api,
               PYTHONPATH=str(REPO), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    server = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    served = None
    try:
        wait_for(lambda: urllib.request.urlopen(f"{api}/health", timeout=2).status == 200, 180, "server", server)
        served = subprocess.Popen([sys.executable, "-m", "flows.deploy"], cwd=project, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

        def deployment_exists() -> bool:
            request = urllib.request.Request(f"{api}/deployments/name/tumorscope-train/train")
            return urllib.request.urlopen(request, timeout=5).status == 200

        wait_for(deployment_exists, 180, "deployment registration", served)
        run = subprocess.run([PREFECT, "deployment", "run", "tumorscope-train/train", "-p", "n_trials=2",
                              "--watch", "--watch-timeout", "600"], cwd=project, env=env,
                             capture_output=True, text=True, timeout=660)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        assert "Completed" in run.stdout
        leaderboard = json.loads((project / "reports" / "leaderboard.json").read_text())
        assert leaderboard["states"].get("COMPLETE", 0) + leaderboard["states"].get("PRUNED", 0) == 2  # the parameter took
        assert json.loads((project / "metrics.json").read_text())["n_test"] > 0
        assert (project / "models" / "model.keras").is_file()
    finally:
        for process in (served, server):
            if process is not None:
                process.terminate()
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
