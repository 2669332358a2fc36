"""The tune stage: one Optuna worker at a time (the Prefect tuning flow, flows/tuning.py, runs the
workers and calls these three in order). Apart from ``stages.training`` so that the study depends
only on what trials run: a change to evaluation or to the trust state does not rerun the study."""

from __future__ import annotations

from tumorscope.config import Params


def run_tune_open(params: Params):
    """Create or load the study and its MLflow parent run (a ``tuning.StudyHandle``)."""
    from tumorscope.tuning.study import open_study

    return open_study(params)


def run_tune_worker(params: Params, worker_index: int = 0, trial_guard=None) -> str:
    """One Optuna worker on the configured study (created if missing); see tumorscope.tuning."""
    from tumorscope.tuning.study import open_study, run_worker

    handle = open_study(params)
    counts = run_worker(params, handle, worker_index, trial_guard)
    return f"tune worker {worker_index}: study {handle.study_name!r} trial states {counts}"


def run_tune_finish(params: Params, handle) -> dict:
    """Leaderboard, best params and plots (reports/), also logged to the study's MLflow run."""
    from tumorscope.tuning.leaderboard import finish_study

    return finish_study(params, handle)
