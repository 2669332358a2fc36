"""Experiment flow (`tumorscope-experiment`): the whole pipeline as a DVC experiment.

The `tumorscope-experiment/train` deployment (flows/deploy.py) and the monitoring flow's retraining
run it: `dvc exp run` in the project folder, so every stage a retrain runs is the one dvc.yaml
declares, the run is recorded by DVC (`dvc exp show`, `dvc exp apply`) and MLflow, and the same
promotion gates as `dvc repro` judge it. New labelled slices are added to the data first
(data.added_dir): a new data version, old + new.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from flows.links import create_report_links
from flows.streaming import run_streamed
from flows.tuning import deployment_overrides, effective_params
from tumorscope.artifacts import RETRAIN_DIR
from tumorscope.config import Params, load_params


def experiment_settings(params_path: str, architectures: list[str] | None, n_trials: int | None,
                        data_source: str | None, workers: int | None) -> dict[str, str]:
    """Flow parameters -> `dvc exp run -S key=value` settings (values as YAML, which DVC parses).
    Validated like params.yaml itself first, so a bad value fails the run before DVC starts."""
    effective_params(params_path, deployment_overrides(params_path, architectures, n_trials, data_source, workers))
    named = {"tune.search_space.architecture": architectures, "tune.n_trials": n_trials,
             "data.source": data_source, "tune.workers": workers}
    return {key: json.dumps(value) for key, value in named.items() if value is not None}


def champion_settings(params: Params, run_params: dict[str, str]) -> dict[str, str]:
    """`dvc exp run -S` settings that train the champion's tuned configuration again without a
    study: its MLflow run's value of every searched train.* setting, and tune.n_trials 0."""
    import yaml

    from tumorscope.config import with_overrides
    from tumorscope.errors import UserError

    missing = [f"train.{k}" for k in params.tune.search_space if f"train.{k}" not in run_params]
    if missing:
        raise UserError(f"the champion's MLflow run lacks {', '.join(missing)}: retrain with monitor.retrain.tune: true")
    values = {k: yaml.safe_load(run_params[f"train.{k}"]) for k in params.tune.search_space}
    checked = with_overrides(params, {"train": values, "tune": {"n_trials": 0}})  # validated as params.yaml is
    return {"tune.n_trials": "0"} | {f"train.{k}": json.dumps(getattr(checked.train, k)) for k in values}


def champion_weights_setting(params: Params, folder: Path = Path(RETRAIN_DIR)) -> dict[str, str]:
    """`dvc exp run -S` setting that starts the training from the champion's weights: the champion
    saved under ``folder`` (named by its version, so a path names one set of weights), as
    train.init_weights."""
    from tumorscope import registry
    from tumorscope.models.saving import save_model

    champion = registry.load_model(params.promote.registered_model, params.serve.model)
    path = save_model(champion.model, folder / f"champion-{champion.version.replace('/', '-')}")
    return {"train.init_weights": json.dumps(str(path))}


def champion_run_params(params: Params) -> dict[str, str]:
    """The MLflow params of the run that trained the champion (serve.model of promote.registered_model)."""
    import mlflow

    from tumorscope import registry, tracking

    tracking.configure(params.mlflow)
    client = mlflow.MlflowClient()
    version = registry.get_version(client, params.promote.registered_model, params.serve.model)
    return dict(client.get_run(version.run_id).data.params)


def experiment_name(flow_run_name: str | None) -> str:
    """The DVC experiment a flow run records when it is not given a name: named after the run."""
    return f"prefect-{flow_run_name or 'run'}"


def dvc_executable() -> str:
    return str(Path(sys.executable).with_name("dvc"))


@task
def add_labelled_batch(params_path: str, folder: str) -> str:
    """Copy a labelled class-per-folder batch into data.added_dir and version it with `dvc add`: the
    experiment then trains on the data as it was plus this batch (a new data version, old + new)."""
    from tumorscope.data.ingest import add_batch

    batch = add_batch(Path(folder), Path(load_params(params_path).data.added_dir))
    done = subprocess.run([dvc_executable(), "add", "-q", str(batch)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"dvc add {batch} exited {done.returncode}: {done.stderr.strip()[-2000:]}")
    get_run_logger().info("added batch %s (from %s)", batch, folder)
    return str(batch)


@task
def dvc_experiment(settings: dict[str, str], name: str) -> dict:
    """`dvc exp run` in this folder: DVC reruns what the settings and the data change, records the
    experiment (`dvc exp show` lists it, `dvc exp apply` brings it back) and holds its repository
    lock, so a second writer waits or fails instead of mixing outputs."""
    command = [dvc_executable(), "exp", "run", "--name", name,
               *[arg for key, value in settings.items() for arg in ("-S", f"{key}={value}")]]
    logger = get_run_logger()
    logger.info("$ %s", " ".join(command))
    done = run_streamed(command, logger)  # every stage's output in the flow run's log as it comes
    if done.returncode != 0:
        raise RuntimeError(f"dvc exp run exited {done.returncode}: {' | '.join(done.stderr_tail[-5:])[-2000:]}")
    params = load_params("params.yaml")
    metrics = json.loads(Path(params.evaluate.metrics_path).read_text())
    promotion = Path(params.promote.report_path)
    decision = json.loads(promotion.read_text()).get("decision") if promotion.is_file() else None
    return {"experiment": name, "settings": settings, "metrics": metrics, "promotion": decision}


@flow(name="tumorscope-experiment", log_prints=True)
def experiment_flow(params_path: str = "params.yaml", architectures: list[str] | None = None,
                    n_trials: int | None = None, data_source: str | None = None, workers: int | None = None,
                    name: str | None = None, add_data: str | None = None, reuse_champion: bool = False,
                    warm_start: bool = False) -> dict:
    """The whole pipeline (data -> tune -> train -> evaluate -> promote) as a DVC experiment with this
    run's parameters over params.yaml: the deployment's flow. ``add_data``: a labelled folder added
    to the data first (data.added_dir), so the run trains on old + new. ``reuse_champion``: no new
    study, the champion's tuned train.* settings (one training instead of a study and a training);
    with ``warm_start`` that training starts from the champion's weights (train.init_weights).
    Tuning inside it runs the tuning flow, tracked here too when the worker's PREFECT_API_URL is set."""
    from prefect.runtime import flow_run

    settings = experiment_settings(params_path, architectures, n_trials, data_source, workers)
    if warm_start and not reuse_champion:
        raise ValueError("warm_start fine-tunes the champion: it needs reuse_champion (the same train.* settings)")
    if reuse_champion:
        params = load_params(params_path)
        settings |= champion_settings(params, champion_run_params(params))
        if warm_start:
            settings |= champion_weights_setting(params)
    name = name or experiment_name(flow_run.get_name())
    added = add_labelled_batch(params_path, add_data) if add_data else None
    result = dvc_experiment(settings, name) | {"added_batch": added}
    metrics = result["metrics"]
    create_markdown_artifact(
        f"DVC experiment `{name}` ({', '.join(f'{k}={v}' for k, v in settings.items()) or 'params.yaml as is'}"
        f"{f'; added batch {added}' if added else ''}): test macro-F1 {metrics['macro_f1']:.3f}, "
        f"recall {metrics['recall']}; {result['promotion'] or 'no promotion report'}; `dvc exp show` lists it.",
        key="tumorscope-experiment", description="DVC experiment of this run")
    create_report_links(load_params("params.yaml"))  # the experiment's Data Docs and drift report
    return result
