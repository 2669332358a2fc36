"""MLflow tracking: experiment set-up, run tags (data version, git commit), and the logging of a
training run, in one place for the train stage, tuning trials and cross-validation folds.

The tracking URI comes from params: an SQLite file by default, PostgreSQL works the same, and a
shared tracking server (``tumorscope mlflow-server``) through which artefacts are proxied.
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


def version_tags(params) -> dict[str, str]:
    """The data version and code version (without importing Keras: the audit run has no model)."""
    split_path = Path(params.split.path)
    return dict(_versions(str(Path.cwd()), str(split_path), _modified(split_path), _modified(Path("dvc.lock"))))


def run_tags(params) -> dict[str, str]:
    """The data version and code version, tagged on every run (train, study, trial)."""
    import keras

    return version_tags(params) | {"keras_backend": keras.backend.backend()}


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


TRACKING_SERVER_SCHEMES = ("http://", "https://")
# The experiment's kind opens it in the MLflow UI's model-training view (without it, MLflow 3
# shows the GenAI view); the note is the description the UI shows above the runs.
EXPERIMENT_TAGS = {
    "mlflow.experimentKind": "custom_model_development",
    "mlflow.note.content": "tumorscope: CT slice classifiers. Runs: train (the train stage), tune-study and "
                           "its tune-trial children (Optuna), crossval and ablation folds. Registered model "
                           "aliases: champion (served), challenger (last evaluated). See docs/pipeline.md.",
}
SPLIT_CONTEXTS = {"train": "training", "val": "validation", "test": "testing"}


def is_tracking_server(uri: str) -> bool:
    return uri.startswith(TRACKING_SERVER_SCHEMES)


def _check_server_reachable(uri: str, key: str) -> None:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=10) as answer:
            answer.read()
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise UserError(f"{key}: cannot reach the MLflow server {uri!r}: {reason} "
                        "(start it with tumorscope mlflow-server)") from None


def redact(url: str) -> str:
    """A database URL without its password, for tags and logs."""
    import sqlalchemy

    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparseable>"


def check_database_reachable(uri: str, key: str) -> None:
    """Fail fast with one line on an unreachable database or tracking server (MLflow itself retries
    for about 100 s before giving up); create the PostgreSQL schema a search_path option names.
    SQLite files are not probed."""
    if is_tracking_server(uri):
        _check_server_reachable(uri, key)
        return
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
        _check_artifact_location(cfg, experiment.artifact_location)
        missing = {key: value for key, value in EXPERIMENT_TAGS.items() if key not in experiment.tags}
        for key, value in missing.items():  # an experiment created before these tags existed
            mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, key, value)
        return experiment.experiment_id
    if is_tracking_server(cfg.tracking_uri):
        # No artifact location: the server's own (mlflow-artifacts:/, proxied), readable from any host.
        return mlflow.create_experiment(cfg.experiment, tags=EXPERIMENT_TAGS)
    artifact_location = Path(cfg.artifact_root).resolve().as_uri()
    return mlflow.create_experiment(cfg.experiment, artifact_location=artifact_location, tags=EXPERIMENT_TAGS)


def _check_artifact_location(cfg: MlflowConfig, location: str) -> None:
    """Through a tracking server, an experiment whose artefacts live in a local folder (created by
    the embedded store) would have each client write into its own disk, unreadable elsewhere."""
    if is_tracking_server(cfg.tracking_uri) and location.startswith("file:"):
        raise UserError(f"mlflow.experiment {cfg.experiment!r} keeps its artefacts in {location}, a folder only one "
                        "host can read: through a tracking server use a new experiment name (its artefacts then go "
                        "through the server)")


def server_command(cfg: MlflowConfig, mlflow_executable: str = "mlflow") -> list[str]:
    """The ``mlflow server`` command line for ``tumorscope mlflow-server``: the database named by
    mlflow.server.backend_store_uri (else mlflow.tracking_uri when it is a database, else the
    embedded SQLite file) and artefacts proxied from mlflow.server.artifacts_destination."""
    server = cfg.server
    backend = server.backend_store_uri or (
        "sqlite:///mlflow.db" if is_tracking_server(cfg.tracking_uri) else cfg.tracking_uri)
    destination = server.artifacts_destination or cfg.artifact_root
    if "://" not in destination:
        destination = Path(destination).resolve().as_uri()
    command = [mlflow_executable, "server", "--backend-store-uri", absolute_sqlite_uri(backend),
               "--serve-artifacts", "--artifacts-destination", destination,
               "--host", server.host, "--port", str(server.port), "--workers", str(server.workers)]
    if server.allowed_hosts:
        command += ["--allowed-hosts", server.allowed_hosts]
    return command


def log_split_datasets(params) -> None:
    """Log the split table's train, validation and test rows as the active run's MLflow datasets
    (the runs table's Datasets column): named after data.source, digest = the split table's
    fingerprint, so runs on the same data show the same datasets."""
    from mlflow.data.pandas_dataset import from_pandas

    from tumorscope.data.split import read_split_table

    table = read_split_table(params.split.path)
    digest = file_fingerprint(params.split.path)
    source_name = Path(params.data.source).name or "data"
    for split, context in SPLIT_CONTEXTS.items():
        rows = table[table["split"] == split].reset_index(drop=True)
        dataset = from_pandas(rows, source=str(params.data.source), name=f"{source_name}-{split}", digest=digest)
        log_input_once_more_after_a_race(dataset, context)


def log_input_once_more_after_a_race(dataset, context: str) -> None:
    """``mlflow.log_input``, tried a second time when it fails as a bad request: MLflow's store
    looks the dataset up and then inserts it, so two runs (tuning workers) logging the same new
    dataset at once both insert and the later one fails on the primary key. The second try finds
    the row and only links it to the run; a request that is really bad fails again and is raised."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        mlflow.log_input(dataset, context=context)
    except MlflowException as err:
        if err.error_code != "BAD_REQUEST":
            raise
        mlflow.log_input(dataset, context=context)


def epoch_logger(prefix: str = ""):
    """A Keras callback that logs every epoch's metrics to the active MLflow run (names prefixed),
    without waiting for the tracking store: MLflow's asynchronous logging sends them from its own
    thread, and a tracking server that is down loses those epochs' curves (MLflow logs the error),
    not the fit. Ending the run waits for what is queued."""
    import logging

    import keras
    import mlflow

    class EpochLogger(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if not logs:
                return
            try:
                mlflow.log_metrics({f"{prefix}{k}": float(v) for k, v in logs.items()}, step=epoch, synchronous=False)
            except Exception as err:  # a fit of hours outweighs one epoch's curve point
                logging.getLogger(__name__).warning("MLflow: epoch %d's metrics not logged: %s", epoch + 1, err)

    return EpochLogger()


def fit_params(params, cfg) -> dict[str, object]:
    """What every training run logs as MLflow params: the train settings it used and the data
    settings it trained on (the same keys for the train stage, a trial and a fold)."""
    return flatten({"seed": params.seed, "train": cfg.model_dump(),
                    "preprocess": {"image_size": params.preprocess.image_size},
                    "split": {"phash_threshold": params.split.phash_threshold}})


def training_fingerprint(params, cfg, classes: list[str]) -> str:
    """What a training depends on: its settings, the data it reads (the split table), the classes
    and the seed. A backup of another fingerprint is never resumed."""
    identity = {"fit": fit_params(params, cfg), "split": file_fingerprint(params.split.path), "classes": classes,
                "cache": params.preprocess.model_dump()}
    return hashlib.sha256(yaml.safe_dump(identity, sort_keys=True).encode()).hexdigest()[:16]


def start_training_run(params, experiment_id: str, name: str, stage: str, parent_run_id: str | None = None,
                       tags: dict[str, str] | None = None, system_metrics: bool = False):
    """An MLflow run for one training (a context manager, like ``mlflow.start_run``), tagged with
    the data and code versions and nested under ``parent_run_id`` when given; ``system_metrics``:
    MLflow samples CPU, memory and GPU use into it while it runs."""
    import mlflow

    nested = {"mlflow.parentRunId": parent_run_id} if parent_run_id else {}
    # nested=True lets a fold's run start while the cross-validation run is active.
    return mlflow.start_run(experiment_id=experiment_id, run_name=name, nested=parent_run_id is not None,
                            tags=run_tags(params) | nested | {"stage": stage} | (tags or {}),
                            log_system_metrics=system_metrics)


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
