"""The same MLflow code path on the SQLite default and on PostgreSQL (for parallel workers)."""

from __future__ import annotations

import uuid

import pytest

from helpers.params import section
from helpers.requirements import needs_postgres, postgres_schema_uri
from tumorscope import tracking
from tumorscope.config import MlflowConfig
from tumorscope.errors import UserError


def _log_and_read_back(cfg: MlflowConfig, tmp_path) -> None:
    import mlflow

    experiment_id = tracking.configure(cfg)
    assert tracking.configure(cfg) == experiment_id  # idempotent: found, not re-created
    model_file = tmp_path / "model.keras"
    model_file.write_bytes(b"stand-in artefact bytes")
    with mlflow.start_run(experiment_id=experiment_id) as run:
        mlflow.log_params(tracking.flatten({"train": {"lr": 0.001, "epochs": 3}}))
        for epoch, loss in enumerate([1.3, 0.9, 0.7]):
            mlflow.log_metrics({"val_loss": loss}, step=epoch)
        mlflow.log_artifact(str(model_file), artifact_path="model")
    stored = mlflow.get_run(run.info.run_id)
    assert stored.data.params == {"train.lr": "0.001", "train.epochs": "3"}
    history = mlflow.tracking.MlflowClient().get_metric_history(run.info.run_id, "val_loss")
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == [1.3, 0.9, 0.7]
    local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="model/model.keras")
    assert open(local, "rb").read() == b"stand-in artefact bytes"


def test_sqlite_store(tmp_path):
    _log_and_read_back(section(MlflowConfig, tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
                                    artifact_root=str(tmp_path / "artifacts"), experiment="t"), tmp_path)


@needs_postgres
def test_postgres_store(tmp_path):
    # A fresh experiment name per run: the shared database outlives the test.
    _log_and_read_back(section(MlflowConfig, tracking_uri=postgres_schema_uri("tumorscope_mlflow"),
                               artifact_root=str(tmp_path / "artifacts"), experiment=f"tumorscope-test-{uuid.uuid4().hex[:8]}"),
                       tmp_path)


def test_unreachable_store_is_one_line_user_error():
    with pytest.raises(UserError, match="mlflow.tracking_uri: cannot open") as err:
        tracking.configure(section(MlflowConfig, tracking_uri="postgresql://nobody@127.0.0.1:1/none"))
    assert "\n" not in str(err.value)


@needs_postgres
def test_two_runs_logging_one_new_dataset_at_once_both_get_it():
    """Tuning workers log the same split datasets into their first trials at the same moment;
    MLflow's store looks a dataset up, then inserts it, so without the second try one of two
    simultaneous calls fails on the primary key (most rounds here, on PostgreSQL)."""
    import threading

    import mlflow
    import pandas as pd
    from mlflow.data.pandas_dataset import from_pandas

    experiment_id = tracking.configure(section(MlflowConfig, tracking_uri=postgres_schema_uri("tumorscope_mlflow"),
                                                    experiment=f"tumorscope-race-{uuid.uuid4().hex[:8]}"))
    client = mlflow.tracking.MlflowClient()
    failures: list[str] = []
    for round_number in range(8):
        dataset = from_pandas(pd.DataFrame({"path": ["a.png", "b.png"]}), source="data", name="slices-train",
                              digest=f"round{round_number}")
        run_ids = [client.create_run(experiment_id).info.run_id for _ in range(2)]
        together = threading.Barrier(len(run_ids))

        def log(run_id: str, dataset=dataset, together=together) -> None:
            try:
                with mlflow.start_run(run_id=run_id):
                    together.wait()
                    tracking.log_input_once_more_after_a_race(dataset, "training")
            except Exception as err:  # noqa: BLE001 -- collected and asserted below
                failures.append(f"{type(err).__name__}: {str(err)[:200]}")

        threads = [threading.Thread(target=log, args=(run_id,)) for run_id in run_ids]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for run_id in run_ids:
            inputs = client.get_run(run_id).inputs.dataset_inputs
            assert [(i.dataset.name, i.dataset.digest) for i in inputs] == [("slices-train", f"round{round_number}")]
    assert not failures, failures
