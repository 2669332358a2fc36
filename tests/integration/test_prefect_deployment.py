"""The deployments end to end as a team runs them, on the shared tiny DVC project: a real Prefect
server, `python -m flows.deploy` registering the experiment and drift deployments on a process work
pool, a `prefect worker start` polling it, and the closed loop: a drift check of a batch from
another scanner alerts a loopback webhook and starts the experiment deployment with that labelled
batch added to the data. The worker runs it as `dvc exp run` (old + new data, a new data version):
`dvc exp show` lists it with its parameters and metrics, MLflow tracks its trials and training, and
the promotion gates decide."""

from __future__ import annotations

import http.server
import json
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest
import yaml

from flows.experiment import experiment_name
from helpers.projects import copy_project, git, monitoring_flow_with_a_worker, run_tool, tool_env

# Uses the session's tiny dvc repro: on its xdist worker (tests/integration/conftest.py).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("tiny-dvc")]


class _Hook(http.server.BaseHTTPRequestHandler):
    received: list = []

    def do_POST(self):  # noqa: N802
        type(self).received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_drift_starts_the_experiment_deployment_on_old_and_new_data_and_the_gates_decide(tiny_dvc_run, prefect_server,
                                                                                          tmp_path):
    project = copy_project(tiny_dvc_run.project, tmp_path / "project")
    hook = http.server.HTTPServer(("127.0.0.1", 0), _Hook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    params = yaml.safe_load((project / "params.yaml").read_text())
    # The run waits for the retraining (in this process, not on the pool's one slot) and passes a
    # parameter; a new study first (retrain.tune), so the tuning flow's artefacts are checked too.
    params["monitor"]["webhook_url"] = f"http://127.0.0.1:{hook.server_address[1]}/drift"
    params["monitor"]["retrain"] |= {"deployment": "tumorscope-experiment/train", "parameters": {"n_trials": 3},
                                     "wait_seconds": 900, "tune": True}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git(["commit", "-q", "-am", "alert and retrain on drift"], project)  # experiments are recorded against a commit
    n_before = sum(json.loads((project / "reports" / "ingest.json").read_text())["files_per_label"].values())
    env = tool_env(project, **prefect_server.env(), PYTHONPATH=str(project))
    pool = "test-pool"
    try:
        deployed, result = monitoring_flow_with_a_worker(project, env, pool, tmp_path / "worker.log")
    finally:
        hook.shutdown()
        hook.server_close()
    assert f"tumorscope-monitor/drift -> work pool '{pool}'" in deployed
    found = json.loads(urllib.request.urlopen(f"{prefect_server.api_url}/work_pools/{pool}", timeout=5).read())
    assert (found["type"], found["concurrency_limit"]) == ("process", 1)  # one writer in this folder at a time
    log = (tmp_path / "worker.log").read_text(errors="replace")[-3000:]
    assert result["status"] == "drift", result["line"]
    retraining = result["retraining"]
    assert retraining["state"] == "COMPLETED", f"{retraining}\n{log}"
    incoming = project / "data" / "incoming"
    assert retraining["parameters"] == {"reuse_champion": False, "n_trials": 3, "add_data": str(incoming.resolve())}
    decision = retraining["promotion"]
    assert decision["version"] == "tumorscope-kidney-ct/2" and decision["decision"] in ("promoted", "refused")
    verdict = "is the new champion" if decision["decision"] == "promoted" else "refused"
    assert decision["line"].startswith(f"promote: tumorscope-kidney-ct/2 {verdict}")
    assert result["alert"]["webhook"] == {"status": 200}
    alert = _Hook.received[-1]
    assert alert["drift"] is True and alert["text"] == result["line"] and alert["retraining"]["promotion"] == decision

    # DVC recorded the run: an experiment named after the flow run, with its parameter and metrics.
    shown = json.loads(run_tool(["dvc", "exp", "show", "--json"], project).stdout)
    experiments = [exp for entry in shown for exp in (entry.get("experiments") or [])]
    named = [exp for exp in experiments if exp.get("name") == experiment_name(retraining["flow_run_name"])]
    assert named, json.dumps(shown)[:3000]
    revision = named[0]["revs"][0]["data"]
    assert revision["params"]["params.yaml"]["data"]["tune"]["n_trials"] == 3
    assert "macro_f1" in revision["metrics"]["metrics.json"]["data"]
    # ...and, per experiment, whether the gates promoted it.
    gate = revision["metrics"]["reports/promotion_metrics.json"]["data"]
    assert gate["promoted"] is (decision["decision"] == "promoted") and gate["challenger_version"] == 2

    # The flow runs were live and left artefacts: the dvc exp run output streamed into the experiment
    # flow run's log line by line, the tuning progress and the leaderboard table.
    def api(path: str, body: dict) -> list:
        request = urllib.request.Request(f"{prefect_server.api_url}{path}", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        return json.loads(urllib.request.urlopen(request, timeout=10).read())

    logs = api("/logs/filter", {"logs": {"flow_run_id": {"any_": [retraining["flow_run_id"]]}}, "limit": 200})
    messages = [entry["message"] for entry in logs]
    assert any("Running stage 'train'" in m for m in messages), messages[:40]
    artifacts: dict = {}
    for artifact in api("/artifacts/filter", {"sort": "CREATED_DESC", "artifacts": {"key": {"any_": [
            "tumorscope-tuning-progress", "tumorscope-leaderboard-table", "tumorscope-data-docs",
            "tumorscope-drift-report"]}}}):
        artifacts.setdefault(artifact["key"], artifact)  # the newest: this retraining's study
    assert float(artifacts["tumorscope-tuning-progress"]["data"]) == 100.0
    assert artifacts["tumorscope-leaderboard-table"]["type"] == "table"
    # Links to the reports: the retraining's Data Docs, the drift check's Evidently report.
    for key, name in (("tumorscope-data-docs", "index.html"), ("tumorscope-drift-report", "drift.html")):
        link = artifacts[key]["data"]  # Prefect 3.8 keeps a link artefact as Markdown: [text](uri)
        assert "](file:///" in link and link.endswith(f"/{name})"), artifacts[key]
    leaderboard = json.loads((project / "reports" / "leaderboard.json").read_text())
    assert sum(leaderboard["states"].get(s, 0) for s in ("COMPLETE", "PRUNED")) == 3
    # Old + new: the batch is versioned with DVC in data/added and ingested beside the old data.
    batches = sorted((project / "data" / "added").glob("incoming-*.dvc"))
    assert len(batches) == 1, sorted((project / "data" / "added").iterdir())
    ingested = json.loads((project / "reports" / "ingest.json").read_text())
    n_new = sum(1 for p in incoming.rglob("*.png"))
    assert ingested["added_batches"][batches[0].stem] and sum(ingested["added_batches"][batches[0].stem].values()) == n_new
    assert sum(ingested["files_per_label"].values()) == n_before + n_new

    # MLflow tracked it: the experiment's trials and its training, nested under its study.
    code = f"""
import json, mlflow
mlflow.set_tracking_uri("sqlite:///{project}/mlflow.db")
runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
stages = sorted(r.data.tags.get("stage") for r in runs)
assert stages.count("tune-trial") >= 3 and stages.count("train") == 2 and stages.count("tune") >= 2, stages
train_run = mlflow.get_run(json.load(open("{project}/models/train.json"))["run_id"])
assert "test_macro_f1" in train_run.data.metrics
print("mlflow ok")
"""
    tracked = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "mlflow ok" in tracked.stdout, tracked.stderr[-3000:]
    assert Path(project / "data" / "added" / batches[0].stem).is_dir()
