"""The Optuna study on real storages: trials, failures, resume, MLflow nesting, leaderboard."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid

import pytest
import yaml

from helpers.paths import BIN, REPO
from helpers.processes import start, stop
from helpers.projects import tool_env
from helpers.requirements import drop_schema, needs_postgres, postgres_schema_uri
from helpers.servers import start_mlflow_server
from tumorscope.config import load_params, with_overrides
from tumorscope.tracking import absolute_sqlite_uri
from tumorscope.tuning.leaderboard import finish_study
from tumorscope.tuning.study import find_parent_run, load_study, open_study, run_worker, stored_study_name

pytestmark = pytest.mark.slow
CLI = [sys.executable, "-m", "tumorscope.cli"]


def child_runs(params, parent_run_id: str):
    import mlflow

    mlflow.set_tracking_uri(absolute_sqlite_uri(params.mlflow.tracking_uri))
    return mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'")


def test_study_records_trials_failures_and_nested_runs(project):
    import mlflow

    params = load_params("params.yaml")
    handle = open_study(params)
    study = load_study(params)
    study.enqueue_trial({"architecture": "small_cnn", "filters": 2})  # filters must be >= 4: this trial fails
    counts = run_worker(params, handle)
    assert counts.get("FAIL") == 1
    assert counts.get("COMPLETE", 0) + counts.get("PRUNED", 0) == params.tune.n_trials

    runs = child_runs(params, handle.parent_run_id)
    assert len(runs) == sum(counts.values())  # one nested run per trial, none lost or doubled
    by_state = {}
    for run in runs:
        by_state.setdefault(run.data.tags["optuna_state"], []).append(run)
    assert [r.info.status for r in by_state["FAIL"]] == ["FAILED"]
    assert "'2' not in" in by_state["FAIL"][0].data.tags["error"]
    for run in by_state.get("COMPLETE", []):
        assert run.info.status == "FINISHED"
        assert 0.0 <= run.data.metrics["final_val_macro_f1"] <= 1.0
        assert run.data.tags["git_commit"] and run.data.tags["dataset_fingerprint"] != "unknown"
        history = mlflow.tracking.MlflowClient().get_metric_history(run.info.run_id, "val_macro_f1")
        assert len(history) == params.tune.trial_epochs  # reported every epoch
    assert all(r.info.status == "KILLED" for r in by_state.get("PRUNED", []))

    summary = finish_study(params, handle)
    rows = summary["leaderboard"]
    assert [r["rank_by"] for r in rows] == sorted((r["rank_by"] for r in rows), reverse=True)
    for row in rows:
        interval = row["scores"]["macro_f1_ci"]
        assert interval["low"] <= interval["high"]
    best = json.loads(open(params.tune.best_params_path).read())
    assert best["trial"] == rows[0]["trial"] and best["study_name"] == handle.study_name
    assert find_parent_run(params) == handle.parent_run_id  # the train stage nests its run here
    # No run ids or times in the DVC outputs (they differ on every run); MLflow and Optuna keep them.
    leaderboard_text = open(params.tune.leaderboard_path).read()
    assert handle.parent_run_id not in leaderboard_text and "seconds" not in leaderboard_text
    assert (project / params.tune.plots_dir / "optimization_history.png").stat().st_size > 1000
    assert "| 1 |" in (project / "reports" / "leaderboard.md").read_text()

    # Resume: the same settings find the same study with nothing left to do; more trials continue it.
    assert run_worker(params, open_study(params)) == counts
    more = with_overrides(params, {"tune": {"n_trials": params.tune.n_trials + 1}})
    assert stored_study_name(more) == stored_study_name(params)
    grown = run_worker(more, open_study(more))
    assert grown.get("COMPLETE", 0) + grown.get("PRUNED", 0) == params.tune.n_trials + 1
    # A different search space is a different study.
    other = with_overrides(params, {"tune": {"search_space": {"lr": [0.001]}}})
    assert stored_study_name(other) != stored_study_name(params)


def _states(params) -> list:
    return load_study(params).get_trials(deepcopy=False)


def test_killed_worker_resumes_the_same_study(project):
    overrides = {"tune": {"n_trials": 3, "trial_epochs": 25, "pruner": "none"}}
    params = with_overrides(load_params("params.yaml"), overrides)
    (project / "params.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json", by_alias=True)))
    open_study(params)
    worker = subprocess.Popen([*CLI, "tune-worker"], cwd=project, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # kill it in the middle of its second trial
        trials = _states(params)
        # ...once its MLflow run is on record (killed before that, there is no run to close).
        if any(t.state.name == "COMPLETE" for t in trials) and any(
                t.state.name == "RUNNING" and "mlflow_run_id" in t.user_attrs for t in trials):
            break
        assert worker.poll() is None, worker.stdout.read()
        time.sleep(0.5)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    before = {t.number: t.value for t in _states(params) if t.state.name == "COMPLETE"}
    killed = [t.number for t in _states(params) if t.state.name == "RUNNING"]
    assert before and len(killed) == 1
    time.sleep(2 * params.tune.heartbeat_seconds + 1)  # the killed trial's heartbeat goes stale

    done = subprocess.run([*CLI, "tune-worker"], cwd=project, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    after = _states(params)
    assert {t.number: t.value for t in after if t.number in before} == before  # completed trials kept
    assert next(t for t in after if t.number == killed[0]).state.name == "FAIL"  # recorded, not lost
    assert sum(t.state.name in ("COMPLETE", "PRUNED") for t in after) == params.tune.n_trials
    assert not [t for t in after if t.state.name in ("RUNNING", "WAITING")]
    # The stale trial's parameters were retried once, and its MLflow run closed as FAILED.
    assert any(t.system_attrs.get("failed_trial") == killed[0] for t in after)
    import mlflow

    mlflow.set_tracking_uri(absolute_sqlite_uri(params.mlflow.tracking_uri))
    killed_run = mlflow.get_run(next(t for t in after if t.number == killed[0]).user_attrs["mlflow_run_id"])
    assert (killed_run.info.status, killed_run.data.tags["optuna_state"]) == ("FAILED", "FAIL")


def _failure_lines(stderr: str) -> list[str]:
    """What a worker said about a failed trial (Optuna's warning and the exception's last line)."""
    return [line for line in stderr.splitlines() if "failed" in line.lower() or "Error" in line][-12:]


@needs_postgres
def test_two_workers_on_one_postgres_study_through_the_mlflow_server(project, tmp_path_factory):
    """Two independent `tumorscope tune-worker` processes (as on two hosts: not children of one flow)
    on one PostgreSQL study, tracking through a shared MLflow server (PostgreSQL backend, artefacts
    proxied): no trial lost or run twice, every trial's run and model in the server's store."""
    name = f"pgtest-{uuid.uuid4().hex[:8]}"
    storage = postgres_schema_uri("tumorscope_optuna")
    mlflow_schema = f"tumorscope_workers_{uuid.uuid4().hex[:8]}"
    server = start_mlflow_server(tmp_path_factory.mktemp("mlflow-server"), postgres_schema_uri(mlflow_schema))
    params = with_overrides(load_params("params.yaml"), {
        # A heartbeat of 30 s, not the project's 2: a busy machine (the suite's other worker) must not
        # make a running trial look stale to the other process, which would fail and retry it.
        "tune": {"storage": storage, "study_name": name, "workers": 2, "n_trials": 6, "trial_epochs": 3,
                 "heartbeat_seconds": 30},
        "mlflow": {"tracking_uri": server.url, "experiment": name}})
    (project / "params.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json", by_alias=True)))
    workers = []
    try:
        handle = open_study(params)
        workers = [subprocess.Popen([*CLI, "tune-worker", "--index", str(i)], cwd=project,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
        outputs = [w.communicate(timeout=600) for w in workers]
        assert [w.returncode for w in workers] == [0, 0], [o[1][-1500:] for o in outputs]
        trials = load_study(params).get_trials(deepcopy=False)
        assert sorted(t.number for t in trials) == list(range(len(trials)))  # none lost, none doubled
        unfinished = [(t.number, t.state.name, t.system_attrs) for t in trials if t.state.name not in ("COMPLETE", "PRUNED")]
        assert not unfinished, (unfinished, [_failure_lines(o[1]) for o in outputs])
        # Both stop at n_trials; a worker that had started its last trial may add one more.
        assert params.tune.n_trials <= len(trials) <= params.tune.n_trials + 1
        assert len({t.user_attrs["worker"] for t in trials}) == 2  # both processes did trials
        run_ids = [t.user_attrs["mlflow_run_id"] for t in trials]
        assert len(set(run_ids)) == len(trials)
        runs = child_runs(params, handle.parent_run_id)
        assert sorted(r.info.run_id for r in runs) == sorted(run_ids)
        # Artefacts went through the server into its folder, none into the workers' project.
        assert all(r.info.artifact_uri.startswith("mlflow-artifacts:") for r in runs)
        assert not (project / params.mlflow.artifact_root).exists()
    finally:
        for w in workers:
            w.kill()
        stop(server.process)
        drop_schema(mlflow_schema)
        import optuna

        optuna.delete_study(study_name=stored_study_name(params), storage=storage)


def flow_runs_on(api_url: str, pool: str) -> list[dict]:
    import httpx

    found = httpx.post(f"{api_url}/flow_runs/filter", timeout=10, json={
        "work_pools": {"name": {"any_": [pool]}}, "limit": 50}).json()
    return list(found)


@needs_postgres
def test_the_flow_fans_workers_out_as_flow_runs_on_a_work_pool(project, prefect_server, tmp_path):
    """tune.fan_out: deployment: `tumorscope tune` starts each worker as a flow run of
    `tumorscope-tune-worker/worker` (registered by flows.deploy), and two `prefect worker` processes
    polling its pool (as on two hosts) run them on one PostgreSQL study: none lost or run twice."""
    shutil.copytree(REPO / "flows", project / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    name = f"fanout-{uuid.uuid4().hex[:8]}"
    storage = postgres_schema_uri("tumorscope_optuna")
    params = with_overrides(load_params("params.yaml"), {
        "tune": {"storage": storage, "study_name": name, "workers": 2, "n_trials": 4, "trial_epochs": 2,
                 "fan_out": "deployment", "heartbeat_seconds": 30},  # 30 s: as above
        "mlflow": {"tracking_uri": postgres_schema_uri("tumorscope_mlflow"), "experiment": name}})
    (project / "params.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json", by_alias=True)))
    # Workers poll every 2 s instead of 10: a test waits for them.
    env = tool_env(project, **prefect_server.env(), PYTHONPATH=str(project), PREFECT_WORKER_QUERY_SECONDS="2")
    pool = f"tuning-{name}"
    hosts = []
    try:
        deployed = subprocess.run([sys.executable, "-m", "flows.deploy", "--pool", f"{pool}-experiments",
                                   "--tuning-pool", pool, "--monitor-every", "0"],
                                  cwd=project, env=env, capture_output=True, text=True, timeout=180)
        assert deployed.returncode == 0, deployed.stdout[-2000:] + deployed.stderr[-2000:]
        assert f"tumorscope-tune-worker/worker -> work pool '{pool}'" in deployed.stdout
        hosts = [start([str(BIN / "prefect"), "worker", "start", "--pool", pool, "--limit", "1", "--name", f"host-{i}"],
                       tmp_path / f"host-{i}.log", env, cwd=tmp_path) for i in range(2)]
        started = time.monotonic()
        tuned = subprocess.run([*CLI, "tune"], cwd=project, env=env, capture_output=True, text=True, timeout=900)
        print(f"tune with two worker flow runs: {time.monotonic() - started:.0f} s")
        logs = "\n".join((tmp_path / f"host-{i}.log").read_text(errors="replace")[-1500:] for i in range(2))
        assert tuned.returncode == 0, tuned.stdout[-2000:] + tuned.stderr[-2000:] + logs
    finally:
        for host in hosts:
            stop(host)
    runs = flow_runs_on(prefect_server.api_url, pool)
    assert sorted(run["parameters"]["worker_index"] for run in runs) == [0, 1]
    assert all(run["state_type"] == "COMPLETED" and run["parent_task_run_id"] for run in runs)  # subflows of tune
    trials = load_study(params).get_trials(deepcopy=False)
    assert sorted(t.number for t in trials) == list(range(len(trials)))  # none lost, none doubled
    assert all(t.state.name in ("COMPLETE", "PRUNED") for t in trials)
    assert params.tune.n_trials <= len(trials) <= params.tune.n_trials + 1
    # Each trial names the process that ran it: at most the two flow runs' (one that started late
    # may find the study finished: trials of two epochs take seconds, a flow run's start longer).
    assert 1 <= len({t.user_attrs["worker"] for t in trials}) <= 2
    assert json.loads((project / params.tune.best_params_path).read_text())
    import optuna

    optuna.delete_study(study_name=stored_study_name(params), storage=storage)


def test_optuna_and_mlflow_in_one_schema_is_refused(project):
    from tumorscope.errors import UserError

    shared = postgres_schema_uri("same")
    params = with_overrides(load_params("params.yaml"), {"tune": {"storage": shared}, "mlflow": {"tracking_uri": shared}})
    with pytest.raises(UserError, match="share one database schema"):
        open_study(params)
    assert not (project / "optuna.db").exists()


@pytest.mark.parametrize("storage, expected", [
    ("notadb://x/y", "tune.storage: invalid storage URL 'notadb://x/y'"),
    ("postgresql://nobody@127.0.0.1:1/none", "tune.storage: cannot open 'postgresql://nobody@127.0.0.1:1/none'"),
    ("sqlite:///no/such/folder/optuna.db", "tune.storage: folder no/such/folder"),
])
def test_bad_storage_is_one_line_and_writes_nothing(project, storage, expected):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["tune"]["storage"] = storage
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    before = sorted(p.relative_to(project) for p in project.rglob("*"))
    done = subprocess.run([*CLI, "tune"], cwd=project, capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, PREFECT_HOME=str(project.parent / "prefect-home")))
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [f"error: {done.stderr.strip()[7:]}"]
    assert expected in done.stderr and "Traceback" not in done.stderr
    assert sorted(p.relative_to(project) for p in project.rglob("*")) == before
