"""The flows' tasks retry what can pass on a second try (a database restarted under them) and not a
user's mistake, which would fail the same way: run on the session's real Prefect server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from helpers.paths import REPO

SCRIPT = textwrap.dedent('''
    import json

    from prefect import flow, task

    from flows.retries import TRANSIENT_RETRIES
    from tumorscope.errors import UserError

    calls = {"blip": 0, "mistake": 0}
    options = TRANSIENT_RETRIES | {"retry_delay_seconds": 0}

    @task(**options)
    def blip():
        calls["blip"] += 1
        if calls["blip"] == 1:
            raise ConnectionError("server closed the connection unexpectedly")
        return "ok"

    @task(**options)
    def mistake():
        calls["mistake"] += 1
        raise UserError("reports/best_params.json not found (run the tune stage first)")

    @flow
    def both():
        return blip(), mistake(return_state=True).is_failed()

    print(json.dumps({"result": both(), "calls": calls}))
''')


def test_a_transient_failure_is_retried_and_a_users_mistake_is_not(prefect_server, tmp_path):
    script = tmp_path / "retries.py"
    script.write_text(SCRIPT)
    done = subprocess.run([sys.executable, str(script)], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO), **prefect_server.env()})
    assert done.returncode == 0, done.stderr[-3000:]
    outcome = json.loads(done.stdout.strip().splitlines()[-1])
    assert outcome == {"result": ["ok", True], "calls": {"blip": 2, "mistake": 1}}


def test_the_flows_tasks_that_touch_stores_retry_unless_the_user_erred():
    from flows import monitoring, tuning
    from flows.retries import retry_unless_user_error

    for task in (tuning.open_study, tuning.tune_worker, tuning.finish_study, monitoring.check_drift):
        assert task.retries == 2 and task.retry_condition_fn is retry_unless_user_error, task.name
