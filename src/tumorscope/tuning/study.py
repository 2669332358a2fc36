"""The study: its RDB storage (an SQLite file by default; PostgreSQL for several worker processes),
its MLflow parent run, the objective (one nested MLflow run per trial; a failing trial is recorded
as FAIL and the study goes on) and the worker loop."""

from __future__ import annotations

import logging
import os
import socket
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tumorscope.config import Params
from tumorscope.errors import UserError
from tumorscope.tracking import redact
from tumorscope.tuning.space import suggest_train_config

PARENT_RUN_ATTR = "mlflow_parent_run_id"
log = logging.getLogger(__name__)
FINISHED_STATES = ("COMPLETE", "PRUNED")


@dataclass(frozen=True)
class StudyHandle:
    study_name: str
    storage: str
    experiment_id: str
    parent_run_id: str


def open_storage(cfg, key: str = "tune.storage"):
    """An Optuna RDBStorage with heartbeats (stale RUNNING trials of a killed worker become FAIL
    and are retried once); one clear line for a bad or unreachable URL."""
    import optuna
    import sqlalchemy

    from tumorscope.tracking import check_database_reachable

    try:
        sqlalchemy.engine.make_url(cfg.storage)
        sqlalchemy.create_engine(cfg.storage).dispose()
    except Exception as err:  # malformed URL, unknown dialect, missing driver
        raise UserError(f"{key}: invalid storage URL {cfg.storage!r}: {str(err).splitlines()[0]}") from None
    if cfg.storage.startswith("sqlite:///"):
        folder = Path(cfg.storage.removeprefix("sqlite:///")).parent
        if not folder.is_dir():
            raise UserError(f"{key}: folder {folder} of the SQLite file does not exist")
    check_database_reachable(cfg.storage, key)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats: stable in practice
        return optuna.storages.RDBStorage(
            cfg.storage,
            heartbeat_interval=cfg.heartbeat_seconds,
            grace_period=2 * cfg.heartbeat_seconds,
            heartbeat_stale_trial_callback=stale_trial_callback,
        )


def stale_trial_callback(study, trial) -> None:
    """A trial whose worker died (no heartbeat): retry its parameters once, and close its MLflow
    run as FAILED so the UI does not show it running forever."""
    import mlflow
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1)(study, trial)
    run_id = trial.user_attrs.get("mlflow_run_id")
    if run_id:
        client = mlflow.tracking.MlflowClient()
        client.set_tag(run_id, "optuna_state", "FAIL")
        client.set_tag(run_id, "error", "worker stopped without a heartbeat (killed or out of memory)")
        client.set_terminated(run_id, status="FAILED")


def make_pruner(cfg):
    import optuna

    if cfg.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=cfg.pruner_warmup_epochs)
    if cfg.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(1, cfg.pruner_warmup_epochs),
                                              max_resource=cfg.trial_epochs)
    return optuna.pruners.NopPruner()


# train.* settings that only the train stage reads: a trial trains one model for tune.trial_epochs.
TRAIN_STAGE_ONLY = frozenset({"epochs", "model_dir", "ensemble_members", "init_weights"})
# evaluate.* settings that decide how a trial is scored (the others are the evaluate stage's).
TRIAL_SCORING = ("critical_class", "bootstrap_samples", "confidence", "max_single_class_share", "calibration_bins",
                 "test_time_augmentation")
# tune.* settings that decide what a trial is and when it stops (the others say how many and where).
TRIAL_TUNE = ("search_space", "trial_epochs", "metric", "min_critical_recall", "pruner", "pruner_warmup_epochs")


def trial_inputs(params: Params) -> dict[str, Any]:
    """Every param a trial's outcome depends on, by its dotted key: the one list behind the study's
    identity (``stored_study_name``) and the tune stage's params in dvc.yaml (a test keeps them
    equal). Searched train settings are in it: the tune stage reruns when their fixed value
    changes, though a trial overrides it (so the study's identity leaves them out)."""
    cfg = params.tune
    train = params.train.model_dump(mode="json", exclude=set(TRAIN_STAGE_ONLY))
    return ({"seed": params.seed}
            | {f"preprocess.{k}": v for k, v in params.preprocess.model_dump(
                mode="json", exclude={"cache_dir", "report_path"}).items()}
            | {f"train.{k}": v for k, v in train.items()}
            | {f"evaluate.{k}": getattr(params.evaluate, k) for k in TRIAL_SCORING}
            | {f"tune.{k}": v for k, v in cfg.model_dump(mode="json", include=set(TRIAL_TUNE)).items()})


def stored_study_name(params: Params) -> str:
    """<study_name>-<hash> of the data (the split table) and ``trial_inputs`` but the searched
    settings, whose fixed values no trial uses. A change of any starts a new study; more trials,
    workers, a restart, a new full budget or ensemble (train.epochs, train.ensemble_members: only
    the train stage uses them) continue the same one."""
    import hashlib
    import json

    from tumorscope import tracking

    split_path = Path(params.split.path)
    searched = {f"train.{name}" for name in params.tune.search_space}
    identity = {"data": tracking.file_fingerprint(split_path) if split_path.is_file() else "none",
                "inputs": {k: v for k, v in trial_inputs(params).items() if k not in searched}}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:8]
    return f"{params.tune.study_name}-{digest}"


def load_study(params: Params, storage=None, worker_index: int = 0):
    """Create the study if needed, else load it (resume); the sampler is seeded per worker so two
    workers do not propose the same first configurations."""
    import optuna

    cfg = params.tune
    if cfg.workers > 1 and cfg.storage.startswith("sqlite"):
        raise UserError(f"tune.workers: {cfg.workers} workers need a server database in tune.storage "
                        "(PostgreSQL); an SQLite file serialises and locks parallel writers")
    if cfg.fan_out == "deployment" and cfg.storage.startswith("sqlite"):
        raise UserError("tune.fan_out: deployment workers may run on other hosts and need a server database in "
                        "tune.storage (PostgreSQL), not an SQLite file")
    storage = storage or open_storage(cfg)
    sampler = optuna.samplers.TPESampler(seed=params.seed + worker_index, constant_liar=True,
                                         n_startup_trials=min(5, cfg.n_trials))
    return optuna.create_study(study_name=stored_study_name(params), storage=storage, direction="maximize",
                               sampler=sampler, pruner=make_pruner(cfg), load_if_exists=True)


def count_states(study) -> dict[str, int]:
    counts: dict[str, int] = {}
    for trial in study.get_trials(deepcopy=False):
        counts[trial.state.name] = counts.get(trial.state.name, 0) + 1
    return counts


def finished_trials(study) -> int:
    counts = count_states(study)
    return sum(counts.get(state, 0) for state in FINISHED_STATES)


# ---------------------------------------------------------------------------------------------
# MLflow parent run


def open_study(params: Params) -> StudyHandle:
    """Check storage and tracking, create/load the study and its MLflow parent run. Everything
    is checked before anything is written, so a bad URL leaves no half-made study behind."""
    import mlflow

    from tumorscope import tracking

    check_separate_stores(params)
    storage = open_storage(params.tune)
    tracking.check_database_reachable(params.mlflow.tracking_uri, "mlflow.tracking_uri")
    study = load_study(params, storage)
    experiment_id = tracking.configure(params.mlflow)
    parent_run_id = study.user_attrs.get(PARENT_RUN_ATTR)
    if parent_run_id is None:
        client = mlflow.tracking.MlflowClient()
        run = client.create_run(experiment_id, run_name=f"study-{study.study_name}",
                                tags=tracking.run_tags(params) | {"stage": "tune", "optuna_study": study.study_name,
                                                         "optuna_storage": redact(params.tune.storage)})
        parent_run_id = run.info.run_id
        client.log_batch(parent_run_id, params=[
            mlflow.entities.Param(k, str(v)[:6000]) for k, v in tracking.flatten(
                {"tune": params.tune.model_dump(mode="json"), "seed": params.seed}).items()])
        study.set_user_attr(PARENT_RUN_ATTR, parent_run_id)
    return StudyHandle(study.study_name, params.tune.storage, experiment_id, parent_run_id)


def check_separate_stores(params: Params) -> None:
    """Optuna and MLflow both keep an `alembic_version` table: in one database schema each
    overwrites the other's and MLflow then refuses to start. Catch it before either writes."""
    from tumorscope.tracking import database_location

    storage, tracking = params.tune.storage, params.mlflow.tracking_uri
    if not storage.startswith("sqlite") and not tracking.startswith(("sqlite", "http", "file")):
        if database_location(storage) == database_location(tracking):
            raise UserError(f"tune.storage and mlflow.tracking_uri share one database schema ({redact(storage)}); "
                            "Optuna and MLflow both keep an alembic_version table: give each its own database "
                            "or schema, e.g. ...?options=-csearch_path%3Doptuna and ...%3Dmlflow")
    elif storage == tracking:
        raise UserError(f"tune.storage and mlflow.tracking_uri are the same file ({storage}); give each its own")


# ---------------------------------------------------------------------------------------------
# Scoring


def infeasibility(scores: dict, min_critical_recall: float) -> str | None:
    """Why a trial may not win, or None. A model that predicts one class is never feasible, even
    though predicting "Tumor" for every slice meets any tumour-recall constraint."""
    if scores.get("degenerate"):
        return "predictions collapse to one class"
    if scores["critical_recall"] is not None and scores["critical_recall"] < min_critical_recall:
        return f"critical recall {scores['critical_recall']:.3f} < {min_critical_recall}"
    return None


def epoch_reporter(trial, metric: str):
    """A Keras callback: after each epoch, report the validation score that fit's own validation
    pass logged (``val_<metric>``, see models.metrics) to Optuna, and stop a trial the pruner
    gives up on. Reading the log costs nothing: no second pass over the validation split."""
    import keras

    class EpochReporter(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.pruned_at: int | None = None

        def on_epoch_end(self, epoch, logs=None):
            logs = logs or {}
            # Data without the critical class has no val_critical_recall: macro-F1 stands in, as
            # in the final score.
            value = logs.get(f"val_{metric}", logs.get("val_macro_f1"))
            if value is None:
                raise RuntimeError(f"fit logged no val_{metric} (logged: {sorted(logs)})")
            trial.report(float(value), epoch)
            if trial.should_prune():
                self.pruned_at = epoch
                self.model.stop_training = True

    return EpochReporter()


# ---------------------------------------------------------------------------------------------
# Objective and worker


def make_objective(params: Params, handle: StudyHandle, trial_guard=None):
    """The Optuna objective: ``models.train.fit_and_score`` on the trial's configuration for
    tune.trial_epochs, scored on validation; one nested MLflow run per trial, logged by
    ``tracking.log_fit`` like every other training. ``trial_guard(architecture)`` may return a
    context manager held while the trial trains (the Prefect flow passes a per-architecture
    concurrency slot)."""
    import mlflow
    import optuna

    from tumorscope import tracking
    from tumorscope.data.preprocess import load_classes, load_groups, load_split
    from tumorscope.models.evaluate import summary_scores
    from tumorscope.models.train import fit_and_score

    cache = params.preprocess.cache_dir
    classes = load_classes(cache)
    train_data = load_split(cache, "train")
    val_images, val_labels = load_split(cache, "val")
    scored = (val_images, val_labels, load_groups(cache, "val"))
    client = mlflow.tracking.MlflowClient()

    def objective(trial) -> float:
        started = time.perf_counter()
        tags = {"optuna_study": handle.study_name, "optuna_trial": str(trial.number)}
        with tracking.start_training_run(params, handle.experiment_id, f"trial-{trial.number}", "tune-trial",
                                         handle.parent_run_id, tags) as run:
            trial.set_user_attr("mlflow_run_id", run.info.run_id)
            trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
            tracking.log_split_datasets(params)
            try:  # a bad suggested value fails here, inside the run, so the failure is on record
                cfg = suggest_train_config(trial, params.train, params.tune.search_space, params.tune.trial_epochs)
                reporter = epoch_reporter(trial, params.tune.metric)
                outcome = fit_and_score(cfg, params.preprocess.image_size, classes, params.seed + trial.number,
                                        train_data, (val_images, val_labels), scored, params.evaluate,
                                        callbacks=[reporter, tracking.epoch_logger()],
                                        guard=trial_guard(cfg.architecture) if trial_guard else None)
            except Exception as err:
                mlflow.set_tags({"optuna_state": "FAIL", "error": f"{type(err).__name__}: {str(err)[:400]}"})
                raise
            tracking.log_fit(params, cfg, outcome, "final_val_")  # after the best epoch's weights were restored
            scores = summary_scores(outcome.scores)
            reason = infeasibility(scores, params.tune.min_critical_recall)
            trial.set_user_attr("architecture", cfg.architecture)
            trial.set_user_attr("scores", scores)
            trial.set_user_attr("feasible", reason is None)
            trial.set_user_attr("infeasible_because", reason)
            trial.set_user_attr("epochs_run", outcome.result.epochs_run)
            trial.set_user_attr("trial_seconds", time.perf_counter() - started)
            trial.set_user_attr("fit_seconds", outcome.result.fit_seconds)
            mlflow.log_metric("trial_seconds", time.perf_counter() - started)
            pruned = reporter.pruned_at is not None
            mlflow.set_tags({"optuna_state": "PRUNED" if pruned else "COMPLETE", "feasible": str(reason is None).lower()}
                            | ({"pruned_at_epoch": str(reporter.pruned_at)} if pruned else {}))
        if pruned:
            client.set_terminated(run.info.run_id, status="KILLED")
            raise optuna.TrialPruned(f"pruned after epoch {reporter.pruned_at}")
        metric = params.tune.metric
        return scores[metric] if scores[metric] is not None else scores["macro_f1"]

    return objective


def run_worker(params: Params, handle: StudyHandle, worker_index: int = 0, trial_guard=None) -> dict[str, int]:
    """Pull trials until the study has tune.n_trials finished trials (or the timeout passes).
    Failed trials are recorded as FAIL and do not count; the study carries on."""
    import optuna

    cfg = params.tune
    study = load_study(params, worker_index=worker_index)
    objective = make_objective(params, handle, trial_guard)
    remaining = cfg.n_trials - finished_trials(study)
    if remaining > 0:
        # Failed trials do not count towards n_trials, so allow some extra attempts; the callback
        # stops every worker once the study holds n_trials finished trials.
        from tumorscope.progress import on_terminal

        study.optimize(objective, n_trials=remaining + max(3, remaining), catch=(Exception,),
                       show_progress_bar=on_terminal() and cfg.workers == 1,
                       timeout=cfg.timeout_minutes * 60 if cfg.timeout_minutes else None,
                       callbacks=[optuna.study.MaxTrialsCallback(
                           cfg.n_trials, states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED))])
    return count_states(study)


def find_parent_run(params: Params) -> str | None:
    """The MLflow run of the study these (untuned) params identify, to nest the final training
    under; None when the study storage or the study is gone (a clone that pulled the results)."""
    import optuna

    sqlite_file = params.tune.storage.removeprefix("sqlite:///")
    if params.tune.storage.startswith("sqlite:///") and not Path(sqlite_file).is_file():
        return None  # opening it would create an empty database
    try:
        summaries = optuna.get_all_study_summaries(open_storage(params.tune), include_best_trial=False)
    except UserError:
        return None
    name = stored_study_name(params)
    return next((s.user_attrs.get(PARENT_RUN_ATTR) for s in summaries if s.study_name == name), None)
