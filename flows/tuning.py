"""Training flow: prepare data -> tune (Optuna) -> train the best configuration -> evaluate.

Each task calls one stage function of ``tumorscope.stages``; nothing here decides anything a DVC
stage would decide differently. The `tune` DVC stage (`tumorscope tune`) runs this flow's tune
step in-process, and the `train` deployment (flows/deploy.py) runs it with every step, so
`dvc repro` and a Prefect run share one code path.

Parallel tuning: with tune.workers > 1 each worker is a separate process (Optuna's n_jobs is
threads only) on the same PostgreSQL-backed study. Per-architecture concurrency: a Prefect global
concurrency limit `tumorscope-arch-<architecture>` (slots from tune.architecture_concurrency)
is held while a trial of that architecture trains, across all workers.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from tumorscope.config import Params, load_params, with_overrides
from tumorscope.stages import promotion as promotion_stages
from tumorscope.stages import training as training_stages

STEPS = ("prepare", "tune", "train", "evaluate", "promote")
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


def retry_unless_user_error(task, task_run, state) -> bool:
    """Retry transient failures (a database hiccup), not a user's mistake that would fail again."""
    from tumorscope.errors import UserError

    try:
        state.result()
    except UserError:
        return False
    except Exception:
        return True
    return True


@task(retries=1, retry_delay_seconds=5, retry_condition_fn=retry_unless_user_error)
def prepare(params_path: str, overrides: dict) -> list[str]:
    """The data stages (phantom only when data.source is the phantom's folder)."""
    from tumorscope.stages import data as data_stages  # here: the tune stage alone does not run them

    params = effective_params(params_path, overrides)
    names = [s for s in data_stages.DATA_STAGES if s != "phantom" or data_stages.uses_phantom(params)]
    summaries = []
    for name in names:
        summaries.append(getattr(data_stages, f"run_{name}")(params))
        get_run_logger().info(summaries[-1])
    return summaries


@task
def open_study(params_path: str, overrides: dict) -> dict:
    return training_stages.run_tune_open(effective_params(params_path, overrides)).__dict__


@task
def tune_worker(params_path: str, overrides: dict, worker_index: int, separate_process: bool) -> str:
    """One Optuna worker: in this process for a single worker, else a child process each."""
    params = effective_params(params_path, overrides)
    limits = params.tune.architecture_concurrency
    if not separate_process:
        return training_stages.run_tune_worker(params, worker_index, architecture_guard(limits) if limits else None)
    with tempfile.TemporaryDirectory() as folder:
        effective = Path(folder) / "params.yaml"
        effective.write_text(yaml.safe_dump(params.model_dump(mode="json", by_alias=True)))
        env = dict(os.environ)
        api_url = current_api_url() if limits else None
        if api_url:
            env["PREFECT_API_URL"] = api_url  # the children share this flow's API (concurrency slots)
        done = subprocess.run([sys.executable, "-m", "tumorscope.cli", "tune-worker", "--params", str(effective),
                               "--index", str(worker_index)], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"tune worker {worker_index} exited {done.returncode}: {done.stderr.strip()[-2000:]}")
    return done.stdout.strip().splitlines()[-1]


@task
def finish_study(params_path: str, overrides: dict, handle: dict) -> dict:
    from tumorscope.tuning import StudyHandle

    summary = training_stages.run_tune_finish(effective_params(params_path, overrides), StudyHandle(**handle))
    create_markdown_artifact(summary["markdown"], key="tumorscope-leaderboard",
                             description=f"Optuna study {summary['study_name']}: leaderboard")
    return {k: summary[k] for k in ("study_name", "states", "parent_run_id", "best")}


@task(retries=1, retry_delay_seconds=5, retry_condition_fn=retry_unless_user_error)
def train_best(params_path: str, overrides: dict) -> str:
    return training_stages.run_train(effective_params(params_path, overrides))


@task
def evaluate(params_path: str, overrides: dict) -> str:
    return training_stages.run_evaluate(effective_params(params_path, overrides))


@task
def promote(params_path: str, overrides: dict) -> str:
    return promotion_stages.run_promote(effective_params(params_path, overrides))


@flow(name="tumorscope-train", log_prints=True)
def training_flow(params_path: str = "params.yaml", architectures: list[str] | None = None,
                  n_trials: int | None = None, data_source: str | None = None, workers: int | None = None,
                  steps: list[str] | None = None) -> dict:
    """prepare -> tune -> train best -> evaluate -> promote (gates); parameters override params.yaml for this run."""
    steps = list(STEPS) if steps is None else steps
    unknown = sorted(set(steps) - set(STEPS))
    if unknown:
        raise ValueError(f"unknown steps {unknown}; choose from {list(STEPS)}")
    overrides = deployment_overrides(params_path, architectures, n_trials, data_source, workers)
    params = effective_params(params_path, overrides)  # fail fast on a bad override
    result: dict = {"steps": list(steps)}
    if "prepare" in steps:
        result["prepare"] = prepare(params_path, overrides)
    if "tune" in steps:
        handle = open_study(params_path, overrides)
        if params.tune.architecture_concurrency:
            ensure_concurrency_limits(params.tune.architecture_concurrency)
        separate = params.tune.workers > 1
        futures = [tune_worker.submit(params_path, overrides, i, separate) for i in range(params.tune.workers)]
        result["workers"] = [future.result() for future in futures]
        result["tune"] = finish_study(params_path, overrides, handle)
        get_run_logger().info(f"tune: best trial {result['tune']['best']['trial']} ({result['tune']['best']['architecture']}), "
              f"states {result['tune']['states']}")
    if "train" in steps:
        result["train"] = train_best(params_path, overrides)
        get_run_logger().info(result["train"])
    if "evaluate" in steps:
        result["evaluate"] = evaluate(params_path, overrides)
        get_run_logger().info(result["evaluate"])
    if "promote" in steps:
        result["promote"] = promote(params_path, overrides)
        get_run_logger().info(result["promote"])
    return result


def preflight(params: Params, steps: list[str]) -> None:
    """Check what a user can get wrong before the flow starts (one line, no flow-run traceback):
    the study storage and the MLflow store must be reachable."""
    from tumorscope import tracking, tuning

    if "tune" in steps:
        tuning.open_storage(params.tune)
    if {"tune", "train", "evaluate", "promote"} & set(steps):
        tracking.check_database_reachable(params.mlflow.tracking_uri, "mlflow.tracking_uri")


def patient_ephemeral_server():
    """Wait up to 180 s (PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS if set) for the temporary
    Prefect server of an in-process run, not Prefect's 20 s: on 2 busy cores its start took longer
    and the `tune` stage failed ("Timed out while attempting to connect to ephemeral Prefect API
    server"). Set in the settings context, since Prefect read the environment at import."""
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, temporary_settings

    seconds = int(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180"))
    return temporary_settings(updates={PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: seconds})


# ---------------------------------------------------------------------------------------------
# Deployment runs: the pipeline as a DVC experiment


def experiment_settings(params_path: str, architectures: list[str] | None, n_trials: int | None,
                        data_source: str | None, workers: int | None) -> dict[str, str]:
    """Flow parameters -> `dvc exp run -S key=value` settings (values as YAML, which DVC parses).
    Validated like params.yaml itself first, so a bad value fails the run before DVC starts."""
    effective_params(params_path, deployment_overrides(params_path, architectures, n_trials, data_source, workers))
    named = {"tune.search_space.architecture": architectures, "tune.n_trials": n_trials,
             "data.source": data_source, "tune.workers": workers}
    return {key: json.dumps(value) for key, value in named.items() if value is not None}


@task
def dvc_experiment(settings: dict[str, str], name: str) -> dict:
    """`dvc exp run` in this folder: DVC reruns what the settings change, records the experiment
    (`dvc exp show` lists it, `dvc exp apply` brings it back) and holds its repository lock, so a
    second writer waits or fails instead of mixing outputs."""
    dvc = str(Path(sys.executable).with_name("dvc"))
    command = [dvc, "exp", "run", "--name", name, *[arg for key, value in settings.items() for arg in ("-S", f"{key}={value}")]]
    logger = get_run_logger()
    logger.info("$ %s", " ".join(command))
    done = subprocess.run(command, capture_output=True, text=True)
    logger.info(done.stdout[-4000:])
    if done.returncode != 0:
        raise RuntimeError(f"dvc exp run exited {done.returncode}: {done.stderr.strip()[-2000:]}")
    metrics = json.loads(Path(load_params("params.yaml").evaluate.metrics_path).read_text())
    return {"experiment": name, "settings": settings, "metrics": metrics}


@flow(name="tumorscope-experiment", log_prints=True)
def experiment_flow(params_path: str = "params.yaml", architectures: list[str] | None = None,
                    n_trials: int | None = None, data_source: str | None = None, workers: int | None = None,
                    name: str | None = None) -> dict:
    """The whole pipeline (data -> tune -> train -> evaluate) as a DVC experiment with this run's
    parameters over params.yaml: the deployment's flow. Tuning inside it runs the training flow,
    tracked here too when the worker's PREFECT_API_URL is set."""
    from prefect.runtime import flow_run

    settings = experiment_settings(params_path, architectures, n_trials, data_source, workers)
    name = name or f"prefect-{flow_run.get_name() or 'run'}"
    result = dvc_experiment(settings, name)
    metrics = result["metrics"]
    create_markdown_artifact(
        f"DVC experiment `{name}` ({', '.join(f'{k}={v}' for k, v in settings.items()) or 'params.yaml as is'}): "
        f"test macro-F1 {metrics['macro_f1']:.3f}, recall {metrics['recall']}; `dvc exp show` lists it.",
        key="tumorscope-experiment", description="DVC experiment of this run")
    return result


def run_in_process(params_path: str, steps: list[str]) -> dict:
    """Run the flow here, against PREFECT_API_URL if set, else a temporary local Prefect server
    (what `tumorscope tune` does for `dvc repro`). Storage and tracking are checked first, so a
    bad URL is one line, not a flow-run traceback."""
    preflight(load_params(params_path), steps)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # The temporary Prefect server inherits this: its telemetry heartbeat races the first
    # migration on a fresh SQLite file and logs a scary traceback.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    with patient_ephemeral_server():
        return training_flow(params_path=params_path, steps=steps)


def summary_lines(result: dict) -> list[str]:
    lines = []
    if "tune" in result:
        best = result["tune"]["best"]
        lines.append(f"tune: best trial {best['trial']} ({best['architecture']}) of study "
                     f"{result['tune']['study_name']}, states {result['tune']['states']}; see reports/leaderboard.md")
    return lines + [result[step] for step in ("train", "evaluate", "promote") if step in result]


if __name__ == "__main__":
    print("\n".join(summary_lines(run_in_process("params.yaml", list(STEPS)))))
