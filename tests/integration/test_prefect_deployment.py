"""The training deployment, end to end as a user runs it: a real Prefect server (temporary
database), `python -m flows.deploy` registering the deployment on a process work pool, a
`prefect worker start` polling it, and a run triggered with `prefect deployment run`. The run is a
DVC experiment (`dvc exp show` lists it with its parameters) and is tracked in MLflow."""

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
from test_dvc_repro import TINY, _git, _run, make_project

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


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


def stop(process: subprocess.Popen | None) -> None:
    if process is None:
        return
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()


def test_deployment_on_a_work_pool_runs_a_recorded_dvc_experiment(tmp_path):
    (tmp_path / "project").mkdir()
    project = make_project(tmp_path / "project", TINY)
    _git(["add", "-A"], project)
    _git(["commit", "-q", "-m", "baseline"], project)  # experiments are recorded against a commit
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_API_URL=api,
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    worker = None
    try:
        wait_for(lambda: urllib.request.urlopen(f"{api}/health", timeout=2).status == 200, 180, "server", server)
        # Unscheduled here: a drift check due at once would queue before the run this test triggers.
        deployed = subprocess.run([sys.executable, "-m", "flows.deploy", "--pool", "test-pool", "--monitor-every", "0"],
                                  cwd=project, env=env, capture_output=True, text=True, timeout=180)
        assert deployed.returncode == 0, deployed.stdout[-2000:] + deployed.stderr[-2000:]
        assert "tumorscope-monitor/drift -> work pool 'test-pool'" in deployed.stdout
        pool = json.loads(urllib.request.urlopen(f"{api}/work_pools/test-pool", timeout=5).read())
        assert (pool["type"], pool["concurrency_limit"]) == ("process", 1)  # one writer in this folder at a time

        worker = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "test-pool"], cwd=tmp_path,
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        run = subprocess.run([str(BIN / "prefect"), "deployment", "run", "tumorscope-experiment/train",
                              "-p", "n_trials=3", "-p", "name=from-prefect", "--watch", "--watch-timeout", "900"],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=960)
        assert run.returncode == 0 and "Completed" in run.stdout, run.stdout[-3000:] + run.stderr[-3000:]
    finally:
        stop(worker)
        stop(server)

    # DVC knows the run: an experiment with the run's parameter, its metrics, and the outputs in place.
    shown = json.loads(_run(["dvc", "exp", "show", "--json"], project).stdout)
    experiments = [exp for entry in shown for exp in (entry.get("experiments") or [])]
    named = [exp for exp in experiments if exp.get("name") == "from-prefect"]
    assert named, json.dumps(shown)[:3000]
    revision = named[0]["revs"][0]["data"]
    assert revision["params"]["params.yaml"]["data"]["tune"]["n_trials"] == 3
    assert "macro_f1" in revision["metrics"]["metrics.json"]["data"]
    leaderboard = json.loads((project / "reports" / "leaderboard.json").read_text())
    assert sum(leaderboard["states"].get(s, 0) for s in ("COMPLETE", "PRUNED")) == 3

    # MLflow tracked it as today: the study's trials and the final training nested under the study.
    code = f"""
import json, mlflow
mlflow.set_tracking_uri("sqlite:///{project}/mlflow.db")
runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
stages = sorted(r.data.tags.get("stage") for r in runs)
assert stages.count("tune-trial") >= 3 and stages.count("train") == 1 and stages.count("tune") == 1, stages
train_run = mlflow.get_run(json.load(open("{project}/models/train.json"))["run_id"])
assert "test_macro_f1" in train_run.data.metrics
print("mlflow ok")
"""
    checked = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "mlflow ok" in checked.stdout, checked.stderr[-3000:]
