"""Optuna study over the train.* search space in params.yaml, every trial tracked in MLflow.

One study lives in an RDB storage (an SQLite file by default; PostgreSQL for several worker
processes). Each worker process runs `run_worker`, which pulls trials until the study has
`tune.n_trials` finished (complete or pruned) trials, so a killed and restarted run, or a second
worker, continues the same study instead of starting over. A trial is one nested MLflow run
under the study's parent run; a failing trial (bad value, out of memory) is recorded as FAIL and
the study goes on.

The leaderboard ranks complete, feasible trials by the lower bound of a bootstrap interval over
duplicate groups of the validation split, not by one point estimate that a lucky split inflates.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tumorscope.config import APPLICATION_ONLY, SMALL_CNN_ONLY, Params, RangeSpec, TrainConfig
from tumorscope.errors import UserError
from tumorscope.reports import read_json, write_json

PARENT_RUN_ATTR = "mlflow_parent_run_id"
log = logging.getLogger(__name__)
FINISHED_STATES = ("COMPLETE", "PRUNED")


@dataclass(frozen=True)
class StudyHandle:
    study_name: str
    storage: str
    experiment_id: str
    parent_run_id: str


# ---------------------------------------------------------------------------------------------
# Search space


def applies_to(name: str, architecture: str) -> bool:
    """Whether train.<name> means anything for this architecture (conditional search space)."""
    if name in APPLICATION_ONLY:
        return architecture != "small_cnn"
    if name in SMALL_CNN_ONLY:
        return architecture == "small_cnn"
    return True


def suggest(trial, name: str, dimension) -> object:
    if isinstance(dimension, list):
        return trial.suggest_categorical(name, dimension)
    assert isinstance(dimension, RangeSpec)
    if TrainConfig.model_fields[name].annotation is int:
        step = int(dimension.step or 1)
        return trial.suggest_int(name, int(dimension.low), int(dimension.high), step=step, log=dimension.log)
    return trial.suggest_float(name, dimension.low, dimension.high, log=dimension.log, step=dimension.step)


def suggest_train_config(trial, base: TrainConfig, space: dict, epochs: int) -> TrainConfig:
    """The trial's train config: base values, the architecture first, then only the settings
    that apply to it (fine-tuning knobs for Applications, filters/norm for the small CNN)."""
    values = {}
    if "architecture" in space:
        values["architecture"] = suggest(trial, "architecture", space["architecture"])
    architecture = str(values.get("architecture", base.architecture))
    for name, dimension in space.items():
        if name != "architecture" and applies_to(name, architecture):
            values[name] = suggest(trial, name, dimension)
    return TrainConfig.model_validate(base.model_dump() | values | {"epochs": epochs})


# ---------------------------------------------------------------------------------------------
# Storage and study


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


def stored_study_name(params: Params) -> str:
    """<study_name>-<hash> of what trials depend on: the data (split and preprocessing), the search
    space, the per-trial budget, the train settings a trial does not search, and how trials are
    scored. A change of any starts a new study; more trials, workers, a restart or a new full
    budget (train.epochs, which only the train stage uses) continue the same one."""
    import hashlib
    import json

    from tumorscope import tracking

    cfg = params.tune
    split_path = Path(params.split.path)
    identity = {
        "data": tracking.file_fingerprint(split_path) if split_path.is_file() else "none",
        "preprocess": params.preprocess.model_dump(exclude={"cache_dir", "report_path"}), "seed": params.seed,
        "train": params.train.model_dump(exclude={"epochs", "model_dir", *cfg.search_space}),
        "scoring": params.evaluate.model_dump(include={"bootstrap_samples", "confidence", "max_single_class_share",
                                                       "calibration_bins"}),
        "search_space": cfg.model_dump(mode="json")["search_space"], "trial_epochs": cfg.trial_epochs,
        "metric": cfg.metric, "min_critical_recall": cfg.min_critical_recall, "pruner": cfg.pruner,
        "warmup": cfg.pruner_warmup_epochs, "critical_class": params.evaluate.critical_class,
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:8]
    return f"{cfg.study_name}-{digest}"


def load_study(params: Params, storage=None, worker_index: int = 0):
    """Create the study if needed, else load it (resume); the sampler is seeded per worker so two
    workers do not propose the same first configurations."""
    import optuna

    cfg = params.tune
    if cfg.workers > 1 and cfg.storage.startswith("sqlite"):
        raise UserError(f"tune.workers: {cfg.workers} workers need a server database in tune.storage "
                        "(PostgreSQL); an SQLite file serialises and locks parallel writers")
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


def redact(url: str) -> str:
    """A storage URL without its password, for tags and logs."""
    import sqlalchemy

    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparseable>"


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


# ---------------------------------------------------------------------------------------------
# Leaderboard


def ranking_key(scores: dict, metric: str) -> float:
    """The lower bound of the metric's group-bootstrap interval (point value if undefined)."""
    interval = scores[f"{metric}_ci"] if scores.get(metric) is not None else scores["macro_f1_ci"]
    point = scores[metric] if scores.get(metric) is not None else scores["macro_f1"]
    return interval["low"] if interval and interval["low"] is not None else point


def leaderboard(study, metric: str) -> list[dict]:
    """Complete trials, feasible first, ranked by the lower interval bound of the metric."""
    rows = []
    for trial in study.get_trials(deepcopy=False, states=None):
        if trial.state.name != "COMPLETE" or "scores" not in trial.user_attrs:
            continue
        scores = trial.user_attrs["scores"]
        rows.append({
            "trial": trial.number, "architecture": trial.user_attrs.get("architecture"),
            "feasible": bool(trial.user_attrs.get("feasible", True)),
            "infeasible_because": trial.user_attrs.get("infeasible_because"),
            "rank_by": ranking_key(scores, metric), "value": trial.value, "params": dict(trial.params),
            "scores": scores, "epochs_run": trial.user_attrs.get("epochs_run"),
        })  # run ids and times stay in MLflow and Optuna: this table is a DVC output that must repeat
    # Feasible first; among the rest a collapsed model comes last, whatever its score.
    rows.sort(key=lambda row: (not row["feasible"], bool(row["scores"].get("degenerate")), -row["rank_by"],
                               row["trial"]))
    return rows


def leaderboard_markdown(rows: list[dict], metric: str, counts: dict[str, int]) -> str:
    lines = [f"Ranked by the lower bound of the {metric} interval (bootstrap over duplicate groups, validation split).",
             "", "| rank | trial | architecture | macro-F1 [interval] | critical recall [interval] | feasible | params |",
             "|---:|---:|---|---|---|---|---|"]
    for rank, row in enumerate(rows, 1):
        s = row["scores"]
        f1 = f"{s['macro_f1']:.3f} [{_fmt(s['macro_f1_ci']['low'])}, {_fmt(s['macro_f1_ci']['high'])}]"
        rec = (f"{s['critical_recall']:.3f} [{_fmt(s['critical_recall_ci']['low'])}, {_fmt(s['critical_recall_ci']['high'])}]"
               if s["critical_recall"] is not None else "n/a")
        shown = ", ".join(f"{k}={_fmt(v)}" for k, v in row["params"].items())
        lines.append(f"| {rank} | {row['trial']} | {row['architecture']} | {f1} | {rec} | {row['feasible']} | {shown} |")
    lines += ["", "Trial states: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))]
    return "\n".join(lines)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 0.01 else f"{value:.3f}"
    return str(value)


def best_train_overrides(row: dict) -> dict:
    """The winning trial's train settings (what the train stage applies over params.train)."""
    return dict(row["params"])


def finish_study(params: Params, handle: StudyHandle) -> dict:
    """Leaderboard, best params and Optuna plots: written to reports/ and the MLflow parent run."""
    import mlflow

    from tumorscope.models.evaluate import flat_scores

    study = load_study(params)
    counts = count_states(study)
    rows = leaderboard(study, params.tune.metric)
    markdown = leaderboard_markdown(rows, params.tune.metric, counts)
    cfg = params.tune
    if not rows:
        raise UserError(f"tune: no trial of study {study.study_name!r} completed (states {counts}); "
                        f"see the failed runs under MLflow run {handle.parent_run_id}")
    best = rows[0]  # feasible trials rank first
    warning = None
    if not best["feasible"]:
        # Still train the best there is (the evaluation and its recall are what a reviewer needs to
        # see); say loudly that the constraint was missed. Promotion gates are the hard stop.
        warning = (f"WARNING: no feasible trial ({params.evaluate.critical_class} recall >= "
                   f"{cfg.min_critical_recall}, tune.min_critical_recall, and predictions not all one class); "
                   f"using the best infeasible trial {best['trial']}: {best['infeasible_because']}")
        markdown = f"**{warning}**\n\n{markdown}"
        log.warning("tune: %s", warning)
    summary = {"study_name": study.study_name, "storage": redact(cfg.storage), "metric": cfg.metric,
               "states": counts, "best": best, "warning": warning, "leaderboard": rows}
    write_json(cfg.leaderboard_path, summary)
    Path(cfg.leaderboard_path).with_suffix(".md").write_text(markdown + "\n")
    write_json(cfg.best_params_path, {"study_name": study.study_name, "trial": best["trial"],
                                      "train": best_train_overrides(best)})
    plots = write_study_plots(study, Path(cfg.plots_dir))
    with mlflow.start_run(run_id=handle.parent_run_id):
        mlflow.log_metrics({"best_trial": best["trial"], **flat_scores(best["scores"], "best_val_"),
                            **{f"trials_{k.lower()}": v for k, v in counts.items()}})
        mlflow.log_artifact(cfg.leaderboard_path)
        mlflow.log_artifact(str(Path(cfg.leaderboard_path).with_suffix(".md")))
        for plot in plots:
            mlflow.log_artifact(str(plot), artifact_path="optuna")
    summary["markdown"] = markdown
    summary["parent_run_id"] = handle.parent_run_id
    return summary


def write_study_plots(study, out_dir: Path) -> list[Path]:
    """Optimisation history and parameter importances (matplotlib, no plotly needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as vis

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    plots: list[tuple[str, Callable[[Any], Any]]] = [("optimization_history.png", vis.plot_optimization_history)]
    # Importances need at least two complete trials and a parameter that varied.
    if len(complete) >= 2 and any(len({str(t.params.get(p)) for t in complete}) > 1 for p in complete[0].params):
        plots.append(("param_importances.png", vis.plot_param_importances))
    for name, plot in plots:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the matplotlib backend is marked experimental
            try:
                axes = plot(study)
            except (ValueError, RuntimeError) as err:  # e.g. importances of a constant column
                log.info("tune: skipped %s: %s", name, err)
                continue
        figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
        figure.set_size_inches(7, 4.5)
        figure.tight_layout()
        figure.savefig(out_dir / name, dpi=110)
        plt.close(figure)
        written.append(out_dir / name)
    return written


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


def read_best_params(params: Params) -> dict:
    path = Path(params.tune.best_params_path)
    if not path.is_file():
        raise UserError(f"{path} not found (run the tune stage first)")
    return read_json(path)
