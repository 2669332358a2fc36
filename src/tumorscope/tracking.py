"""MLflow tracking: experiment set-up, run tags (data version, git commit), and the logging of a
training run, in one place for the train stage, tuning trials and cross-validation folds.

The tracking URI comes from params (an SQLite file by default, PostgreSQL works the same).
"""

from __future__ import annotations

import functools
import hashlib
import subprocess
from pathlib import Path

import yaml

from tumorscope.config import MlflowConfig
from tumorscope.errors import UserError


def flatten(mapping: dict, prefix: str = "") -> dict[str, object]:
    """{'train': {'lr': 1}} -> {'train.lr': 1}, for MLflow params."""
    flat = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def git_commit(cwd: str | Path = ".") -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def dvc_out_hash(stage: str, lock_path: str | Path = "dvc.lock") -> str:
    """md5 of a stage's first output as recorded in dvc.lock (the DVC data version), if any."""
    path = Path(lock_path)
    if not path.is_file():
        return "unknown"
    lock = yaml.safe_load(path.read_text()) or {}
    outs = lock.get("stages", {}).get(stage, {}).get("outs", [])
    return str(outs[0].get("md5", "unknown")) if outs else "unknown"


def file_fingerprint(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def postgres_schema(uri: str) -> str | None:
    """The schema a PostgreSQL URL selects with ``?options=-csearch_path=<schema>``, if any."""
    from urllib.parse import unquote

    import sqlalchemy

    options = unquote(str(sqlalchemy.engine.make_url(uri).query.get("options", "")))
    for part in options.split():
        if part.startswith("-csearch_path="):
            return part.removeprefix("-csearch_path=").split(",")[0].strip() or None
    return None


def database_location(uri: str) -> tuple[str, str | None]:
    """(server and database, schema): two stores at one location share tables."""
    import sqlalchemy

    url = sqlalchemy.engine.make_url(uri)
    return (f"{url.get_backend_name()}://{url.host}:{url.port}/{url.database}",
            postgres_schema(uri) if url.get_backend_name() == "postgresql" else None)


def run_tags(params) -> dict[str, str]:
    """The data version and code version, tagged on every run (train, study, trial)."""
    import keras

    split_path = Path(params.split.path)
    return dict(_versions(str(Path.cwd()), str(split_path), _modified(split_path), _modified(Path("dvc.lock")))) | {
        "keras_backend": keras.backend.backend()}


def _modified(path: Path) -> int | None:
    return path.stat().st_mtime_ns if path.is_file() else None


@functools.lru_cache(maxsize=8)
def _versions(cwd: str, split_path: str, split_modified: int | None, lock_modified: int | None) -> tuple:
    """Git commit, split fingerprint and DVC data hash, computed once per process while the files
    they read are unchanged: a worker starting trial after trial would otherwise run git and hash
    the split table before each one (and a worker killed in that window leaves an unfinished run)."""
    return (("git_commit", git_commit(cwd)),
            ("dataset_fingerprint", file_fingerprint(split_path) if split_modified is not None else "unknown"),
            ("dvc_raw_md5", dvc_out_hash("ingest", Path(cwd) / "dvc.lock")))


def check_database_reachable(uri: str, key: str) -> None:
    """Fail fast with one line on an unreachable database server (MLflow itself retries for
    about 100 s before giving up); create the PostgreSQL schema a search_path option names.
    SQLite files and HTTP tracking servers are not probed."""
    if not uri.startswith(("postgresql", "mysql", "mssql")):
        return
    import sqlalchemy

    try:
        engine = sqlalchemy.create_engine(uri)
        schema = postgres_schema(uri) if uri.startswith("postgresql") else None
        with engine.connect() as connection:
            if schema:
                connection.execute(sqlalchemy.text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
                connection.commit()
        engine.dispose()
    except Exception as err:  # driver errors vary: refused, unknown host, auth, missing driver
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{key}: cannot open {uri!r}: {first_line}") from None


def absolute_sqlite_uri(uri: str) -> str:
    """sqlite:///relative.db -> sqlite:////abs/dir/relative.db (other URIs unchanged).

    MLflow caches one store per URI string for the life of the process: a relative SQLite URI
    would keep pointing at the first folder it was opened from (a Prefect worker serving runs in
    several folders, a test session), silently logging into the wrong database."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix) or uri.startswith(prefix + "/") or uri == prefix + ":memory:":
        return uri
    return prefix + str(Path(uri.removeprefix(prefix)).resolve())


def configure(cfg: MlflowConfig) -> str:
    """Point MLflow at the configured store and return the experiment id (created if missing)."""
    import mlflow

    check_database_reachable(cfg.tracking_uri, "mlflow.tracking_uri")
    mlflow.set_tracking_uri(absolute_sqlite_uri(cfg.tracking_uri))
    try:
        experiment = mlflow.get_experiment_by_name(cfg.experiment)
    except Exception as err:  # unreachable database, bad URI: MLflow raises many types
        raise UserError(f"mlflow.tracking_uri: cannot open tracking store {cfg.tracking_uri!r}: "
                        f"{str(err).splitlines()[0]}") from None
    if experiment is not None:
        return experiment.experiment_id
    artifact_location = Path(cfg.artifact_root).resolve().as_uri()
    return mlflow.create_experiment(cfg.experiment, artifact_location=artifact_location)


def epoch_logger():
    """A Keras callback that logs every epoch's metrics to the active MLflow run."""
    import keras
    import mlflow

    class EpochLogger(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if logs:
                mlflow.log_metrics({k: float(v) for k, v in logs.items()}, step=epoch)

    return EpochLogger()


def fit_params(params, cfg) -> dict[str, object]:
    """What every training run logs as MLflow params: the train settings it used and the data
    settings it trained on (the same keys for the train stage, a trial and a fold)."""
    return flatten({"seed": params.seed, "train": cfg.model_dump(),
                    "preprocess": {"image_size": params.preprocess.image_size},
                    "split": {"phash_threshold": params.split.phash_threshold}})


def start_training_run(params, experiment_id: str, name: str, stage: str, parent_run_id: str | None = None,
                       tags: dict[str, str] | None = None):
    """An MLflow run for one training (a context manager, like ``mlflow.start_run``), tagged with
    the data and code versions and nested under ``parent_run_id`` when given."""
    import mlflow

    nested = {"mlflow.parentRunId": parent_run_id} if parent_run_id else {}
    # nested=True lets a fold's run start while the cross-validation run is active.
    return mlflow.start_run(experiment_id=experiment_id, run_name=name, nested=parent_run_id is not None,
                            tags=run_tags(params) | nested | {"stage": stage} | (tags or {}))


def log_fit(params, cfg, outcome, prefix: str) -> None:
    """Log one ``models.train.fit_and_score`` outcome to the active run: params, how it trained,
    and its scores on the scored set (``prefix``: "final_val_" after the best epoch's weights were
    restored, "test_" for a held-out fold). Per-epoch metrics come from ``epoch_logger`` during
    the fit."""
    import mlflow

    from tumorscope.models.evaluate import flat_scores

    result = outcome.result
    mlflow.log_params(fit_params(params, cfg) | {"effective_batch_size": result.batch_size})
    mlflow.set_tag("precision", outcome.precision)
    mlflow.log_metrics({"epochs_run": result.epochs_run, "fit_seconds": result.fit_seconds,
                        "train_images_per_second": result.images_per_second}
                       | flat_scores(outcome.scores, prefix))
