"""A short soak of the real service (benchmarks/soak.py; the long one: `make bench`,
benchmarks/bench_soak.py): concurrent clients mixing valid slices, malformed uploads, explanations,
batches and reloads for a fixed time. Nothing may get a 5xx, every malformed upload a 4xx, every
valid request the answer the service gave before the soak; the service's memory is reported."""

from __future__ import annotations

import pytest

from benchmarks.soak import run_soak
from helpers.images import phantom_pngs

# The session Bento server, on its xdist worker (tests/integration/conftest.py).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("bento")]

SECONDS = 20
CLIENTS = 3


def test_a_short_soak_has_no_5xx_and_answers_every_valid_request_correctly(served):
    report = run_soak(served.url, phantom_pngs(2), SECONDS, CLIENTS, server_pid=served.process.pid)
    print("\n" + report.summary())
    assert report.requests >= 20 and report.by_action["classify"] > 0 and report.by_action["malformed"] > 0
    assert not report.server_errors, report.summary()
    assert not report.wrong_answers, report.wrong_answers[:5]
    assert not report.unrefused, report.unrefused[:5]
    assert report.rss_start_mb and report.rss_start_mb > 100  # the API and model processes were measured
