"""Every epoch's metrics reach the MLflow run without the fit waiting for the tracking store, and a
tracking server that goes away loses those epochs' points, not the fit."""

from __future__ import annotations

import mlflow
from mlflow import MlflowClient

from tumorscope.runtime import free_port
from tumorscope.tracking import epoch_logger


def test_epochs_are_logged_and_a_tracking_blip_does_not_end_the_fit(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the lost epoch fails at once, not after minutes
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(store)
    try:
        callback = epoch_logger("member_1.")
        with mlflow.start_run() as run:
            callback.on_epoch_end(0, {"loss": 1.0, "val_loss": 1.5})
            mlflow.flush_async_logging()
            mlflow.set_tracking_uri(f"http://127.0.0.1:{free_port()}")  # the tracking server is gone
            callback.on_epoch_end(1, {"loss": 0.5})  # returns: the fit goes on
            mlflow.flush_async_logging()
            mlflow.set_tracking_uri(store)  # and back
            callback.on_epoch_end(2, {"loss": 0.25})
        history = MlflowClient(store).get_metric_history(run.info.run_id, "member_1.loss")
        assert sorted((m.step, m.value) for m in history) == [(0, 1.0), (2, 0.25)]
        assert [m.value for m in MlflowClient(store).get_metric_history(run.info.run_id, "member_1.val_loss")] == [1.5]
    finally:
        mlflow.set_tracking_uri(previous)
