"""When a flow's task runs again: transient failures (a database hiccup, a tracking server's blip)
are retried, a user's mistake (``UserError``: a missing file, a bad setting) is not, since it would
fail the same way."""

from __future__ import annotations

from typing import Any


def retry_unless_user_error(task, task_run, state) -> bool:
    """Prefect's ``retry_condition_fn``: retry unless the task failed with a ``UserError``."""
    from tumorscope.errors import UserError

    try:
        state.result()
    except UserError:
        return False
    except Exception:
        return True
    return True


# For tasks that are safe to run again: opening and finishing the Optuna study (its storage and
# MLflow), a tuning worker (it continues the study, trials counted in the storage), the drift check.
TRANSIENT_RETRIES: dict[str, Any] = {"retries": 2, "retry_delay_seconds": 10, "retry_condition_fn": retry_unless_user_error}
