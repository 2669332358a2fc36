"""Tuning flow (`tumorscope-tune`): the Optuna study of the `tune` DVC stage.

The stage graph lives in dvc.yaml alone; `tumorscope tune` runs this flow in-process, and how
trials run (workers, retries, per-architecture concurrency) is Prefect's job. The whole pipeline
as a Prefect run is flows/experiment.py (`dvc exp run`).

Parallel tuning: with tune.workers > 1 each worker is a separate process (Optuna's n_jobs is
threads only) on the same PostgreSQL-backed study. With tune.fan_out: deployment each worker is
instead a flow run of the `tumorscope-tune-worker` deployment (`tune_worker_flow`), taken by any
Prefect worker polling its work pool, so more hosts with a Prefect worker means more trials at
once. Per-architecture concurrency: a Prefect global concurrency limit
`tumorscope-arch-<architecture>` (slots from tune.architecture_concurrency) is held while a trial
of that architecture trains, across all workers and hosts.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import cast
from uuid import UUID

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from flows.retries import TRANSIENT_RETRIES
from flows.streaming import run_streamed
from tumorscope.config import Params, load_params, with_overrides
from tumorscope.runtime import apply_cpu_defaults
from tumorscope.stages import tuning as tuning_stages

LIMIT_PREFIX = "tumorscope-arch-"


def effective_params(params_path: str, overrides: dict) -> Params:
    return with_overrides(load_params(params_path), overrides)


def deployment_overrides(params_path: str, architectures: list[str] | None, n_trials: int | None,
                         data_source: str | None, workers: int | None) -> dict:
    """Flow parameters -> nested params.yaml overrides (validated like params.yaml itself). An
    architectures list replaces only the architecture choice, not the rest of the search space."""
    tune: dict = {}
    if architectures:
        space = load_params(params_path).tune.model_dump(mode="json")["search_space"]
        tune["search_space"] = space | {"architecture": list(architectures)}
    if n_trials is not None:
        tune["n_trials"] = n_trials
    if workers is not None:
        tune["workers"] = workers
    overrides: dict = {"tune": tune} if tune else {}
    if data_source is not None:
        overrides["data"] = {"source": data_source}
    return overrides


def architecture_guard(limits: dict[str, int]):
    """trial_guard for tumorscope.tuning: hold a Prefect concurrency slot of the trial's
    architecture while it trains (no-op for architectures without a configured limit)."""
    from prefect.concurrency.sync import concurrency

    def guard(architecture: str):
        if architecture not in limits:
            return contextlib.nullcontext()
        return concurrency(f"{LIMIT_PREFIX}{architecture}", occupy=1, strict=True)

    return guard


def ensure_concurrency_limits(limits: dict[str, int]) -> None:
    """Create or update one global concurrency limit per architecture (idempotent)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
    from prefect.exceptions import ObjectAlreadyExists

    with get_client(sync_client=True) as client:
        for architecture, slots in limits.items():
            name = f"{LIMIT_PREFIX}{architecture}"
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=slots))
            except ObjectAlreadyExists:
                client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(limit=slots))


def current_api_url() -> str | None:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return str(client.api_url)


@task(**TRANSIENT_RETRIES)
def open_study(params_path: str, overrides: dict) -> dict:
    return tuning_stages.run_tune_open(effective_params(params_path, overrides)).__dict__


@task(**TRANSIENT_RETRIES)
def tune_worker(params_path: str, overrides: dict, worker_index: int, separate_process: bool) -> str:
    """One Optuna worker: in this process for a single worker, else a child process each."""
    params = effective_params(params_path, overrides)
    limits = params.tune.architecture_concurrency
    if not separate_process:
        return tuning_stages.run_tune_worker(params, worker_index, architecture_guard(limits) if limits else None)
    with tempfile.TemporaryDirectory() as folder:
        effective = Path(folder) / "params.yaml"
        effective.write_text(yaml.safe_dump(params.model_dump(mode="json", by_alias=True)))
        env = dict(os.environ)
        api_url = current_api_url() if limits else None
        if api_url:
            env["PREFECT_API_URL"] = api_url  # the children share this flow's API (concurrency slots)
        # Each trial's epochs in the flow run's log as they come, marked with the worker.
        done = run_streamed([sys.executable, "-m", "tumorscope.cli", "tune-worker", "--params", str(effective),
                             "--index", str(worker_index)], get_run_logger(), prefix=f"[worker {worker_index}] ",
                            env=env)
    if done.returncode != 0:
        raise RuntimeError(f"tune worker {worker_index} exited {done.returncode}: "
                           f"{' | '.join(done.stderr_tail[-5:])[-2000:]}")
    return [line for line in done.stdout_tail if line.strip()][-1]


@task(**TRANSIENT_RETRIES)
def finish_study(params_path: str, overrides: dict, handle: dict) -> dict:
    from tumorscope.tracking import flatten, is_tracking_server
    from tumorscope.tuning.study import StudyHandle

    params = effective_params(params_path, overrides)
    summary = tuning_stages.run_tune_finish(params, StudyHandle(**handle))
    create_markdown_artifact(summary["markdown"], key="tumorscope-leaderboard",
                             description=f"Optuna study {summary['study_name']}: leaderboard")
    create_table_artifact([flatten(row) for row in summary["leaderboard"]], key="tumorscope-leaderboard-table",
                          description=f"Optuna study {summary['study_name']}: every trial, best first")
    if is_tracking_server(params.mlflow.tracking_uri):  # a link only a shared server makes useful
        create_link_artifact(f"{params.mlflow.tracking_uri.rstrip('/')}/#/experiments/{handle['experiment_id']}/runs/"
                             f"{handle['parent_run_id']}", link_text="the study's MLflow run",
                             key="tumorscope-study-mlflow-run")
    return {k: summary[k] for k in ("study_name", "states", "parent_run_id", "best")}


@flow(name="tumorscope-tune-worker", log_prints=True)
def tune_worker_flow(params_path: str = "params.yaml", overrides: dict | None = None, worker_index: int = 0) -> str:
    """One Optuna worker as its own flow run: what the tuning flow starts per worker with
    tune.fan_out: deployment. It runs in the project clone of whichever host's Prefect worker took
    it (same commit, the cache pulled) and joins the study by name in tune.storage."""
    params = effective_params(params_path, overrides or {})
    limits = params.tune.architecture_concurrency
    return tuning_stages.run_tune_worker(params, worker_index, architecture_guard(limits) if limits else None)


@flow(name="tumorscope-tune", log_prints=True)
def tuning_flow(params_path: str = "params.yaml", architectures: list[str] | None = None,
                n_trials: int | None = None, workers: int | None = None) -> dict:
    """The Optuna study of the `tune` DVC stage: open it, run tune.workers workers on it (retries,
    per-architecture concurrency; here or as deployment flow runs, tune.fan_out), write the
    leaderboard and the best parameters. Parameters override params.yaml for this run. Everything
    before and after it is a DVC stage."""
    overrides = deployment_overrides(params_path, architectures, n_trials, None, workers)
    params = effective_params(params_path, overrides)  # fail fast on a bad override
    if params.tune.n_trials == 0:  # no study: params.yaml's train.* (a retraining reusing the champion's)
        from tumorscope.tuning.leaderboard import fixed_configuration

        return {"workers": [], "tune": fixed_configuration(params)}
    handle = open_study(params_path, overrides)
    if params.tune.architecture_concurrency:
        ensure_concurrency_limits(params.tune.architecture_concurrency)
    result: dict = {}
    if params.tune.fan_out == "deployment":
        result["workers"] = fan_out_workers(params_path, overrides, params, handle)
    else:
        separate = params.tune.workers > 1
        futures = [tune_worker.submit(params_path, overrides, i, separate) for i in range(params.tune.workers)]

        def wait_for_workers(seconds: float) -> bool:
            pending = [future for future in futures if not future.state.is_final()]
            if pending:
                pending[0].wait(timeout=seconds)
            return all(future.state.is_final() for future in futures)

        watch_progress(wait_for_workers, params, handle)
        result["workers"] = [future.result() for future in futures]
    result["tune"] = finish_study(params_path, overrides, handle)
    best = result["tune"]["best"]
    get_run_logger().info(f"tune: best trial {best['trial']} ({best['architecture']}), states {result['tune']['states']}")
    return result


def fan_out_workers(params_path: str, overrides: dict, params: Params, handle: dict) -> list[str]:
    """Start tune.workers flow runs of tune.worker_deployment (subflows of this run), wait for all
    of them, and raise naming any that did not complete."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import FlowRun
    from prefect.deployments import run_deployment

    # run_deployment is sync-compatible: called from sync code it returns the flow run, not a coroutine.
    runs = [cast(FlowRun, run_deployment(params.tune.worker_deployment, timeout=0, as_subflow=True, parameters={
        "params_path": params_path, "overrides": overrides, "worker_index": index}))
        for index in range(params.tune.workers)]
    get_run_logger().info(f"tune: {len(runs)} worker flow run(s) of {params.tune.worker_deployment}: "
                          + ", ".join(run.name for run in runs))

    def wait_for_workers(seconds: float) -> bool:
        with get_client(sync_client=True) as client:
            states = [client.read_flow_run(run.id).state for run in runs]
        if all(state is not None and state.is_final() for state in states):
            return True
        time.sleep(seconds)
        return False

    watch_progress(wait_for_workers, params, handle)
    with get_client(sync_client=True) as client:
        finished = [client.read_flow_run(run.id) for run in runs]
    outcome = [f"worker {index}: flow run {run.name} {run.state.type.value if run.state else 'UNKNOWN'}"
               for index, run in enumerate(finished)]
    if any(run.state is None or not run.state.is_completed() for run in finished):
        raise RuntimeError("tune workers did not all complete: " + "; ".join(outcome))
    return outcome


PROGRESS_SECONDS = 5.0


def watch_progress(wait_for_workers: Callable[[float], bool], params: Params, handle: dict) -> None:
    """A progress artefact on the flow run (the share of tune.n_trials finished), updated every few
    seconds from the study's storage until ``wait_for_workers`` (waiting at most the seconds given)
    says every worker has ended."""
    from tumorscope.tuning.study import count_states, load_study

    def finished_share() -> float:
        states = count_states(load_study(params))
        return 100.0 * min(1.0, sum(states.get(s, 0) for s in ("COMPLETE", "PRUNED", "FAIL")) / params.tune.n_trials)

    description = f"Optuna study {handle['study_name']}: trials finished of {params.tune.n_trials}"
    artifact = cast(UUID, create_progress_artifact(finished_share(), key="tumorscope-tuning-progress",
                                                   description=description))
    while not wait_for_workers(PROGRESS_SECONDS):
        update_progress_artifact(artifact, finished_share())
    update_progress_artifact(artifact, finished_share())


def preflight(params: Params) -> None:
    """Check what a user can get wrong before the flow starts (one line, no flow-run traceback):
    the study storage and the MLflow store must be reachable."""
    from tumorscope import tracking
    from tumorscope.tuning.study import open_storage

    open_storage(params.tune)
    tracking.check_database_reachable(params.mlflow.tracking_uri, "mlflow.tracking_uri")


def patient_ephemeral_server():
    """Wait up to 180 s (PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS if set) for the temporary
    Prefect server of an in-process run, not Prefect's 20 s: on 2 busy cores its start took longer
    and the `tune` stage failed ("Timed out while attempting to connect to ephemeral Prefect API
    server"). Set in the settings context, since Prefect read the environment at import."""
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, temporary_settings

    seconds = int(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180"))
    return temporary_settings(updates={PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: seconds})


def run_in_process(params_path: str) -> dict:
    """Run the tuning flow here, against PREFECT_API_URL if set, else a temporary local Prefect
    server (what `tumorscope tune` does for `dvc repro`). Storage and tracking are checked first,
    so a bad URL is one line, not a flow-run traceback."""
    preflight(load_params(params_path))
    apply_cpu_defaults()  # the trials it starts import TensorFlow
    # The temporary Prefect server inherits this: its telemetry heartbeat races the first
    # migration on a fresh SQLite file and logs a scary traceback.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    with patient_ephemeral_server():
        return tuning_flow(params_path=params_path)


def summary_line(result: dict) -> str:
    best = result["tune"]["best"]
    if result["tune"]["study_name"] is None:
        return f"tune: {result['tune']['note']} ({best['architecture']}, {best['params']}); see reports/leaderboard.md"
    return (f"tune: best trial {best['trial']} ({best['architecture']}) of study {result['tune']['study_name']}, "
            f"states {result['tune']['states']}; see reports/leaderboard.md")
