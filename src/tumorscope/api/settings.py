"""Where the service's params come from, and its read-only MLflow connection."""

from __future__ import annotations

import os
from pathlib import Path

PARAMS_ENV = "TUMORSCOPE_PARAMS"


def params_path() -> Path:
    """$TUMORSCOPE_PARAMS, else params.yaml in the working directory."""
    return Path(os.environ.get(PARAMS_ENV) or "params.yaml")


def load_service_params():
    from tumorscope.config import load_params

    return load_params(params_path())


def load_service_settings():
    """(params, API keys, replica id) for the service; a mistake in any is one line on stderr and
    exit status 2 at start-up, not a traceback from inside the server."""
    import sys

    from tumorscope.api.auth import check_exposure, load_keys, served_host
    from tumorscope.errors import UserError
    from tumorscope.monitoring.log_files import replica_id

    try:
        params = load_service_params()
        keys = load_keys(params.serve.auth)
        check_exposure(served_host(sys.argv, bentoml_default_host()), keys, params.serve.auth)
        return params, keys, replica_id(params.serve.replica_id)
    except UserError as err:
        print(f"tumorscope service: error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def bentoml_default_host() -> str:
    """The address ``bentoml serve`` binds without ``--host`` (its configuration; 0.0.0.0 unless set)."""
    try:
        from bentoml._internal.configuration.containers import BentoMLContainer

        return str(BentoMLContainer.http.host.get())
    except Exception:  # another BentoML layout: assume its documented default, every interface
        return "0.0.0.0"


def configure_tracking(cfg) -> None:
    """Point MLflow at the configured store without creating anything (serving only reads)."""
    import mlflow

    from tumorscope.tracking import absolute_sqlite_uri, check_database_reachable

    check_database_reachable(cfg.tracking_uri, "mlflow.tracking_uri")
    mlflow.set_tracking_uri(absolute_sqlite_uri(cfg.tracking_uri))
