"""Subprocess output reaches the flow run's logger line by line while the process runs, not when
it ends; stderr lines as warnings; the tails and the exit status come back."""

from __future__ import annotations

import logging
import sys
import textwrap
import threading

from flows.streaming import run_streamed


class Collect(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self.first_line = threading.Event()

    def emit(self, record):
        self.records.append(record)
        if record.getMessage() == "[w0] epoch 1":
            self.first_line.set()


def test_lines_are_logged_as_they_come(tmp_path):
    go_on = tmp_path / "go-on"
    # The child prints a line, then waits until the test has seen that line in the log: with
    # output collected only at exit this would never finish (the 60 s guard fails it instead).
    child = textwrap.dedent(f"""
        import pathlib, sys, time
        print("epoch 1", flush=True)
        deadline = time.time() + 60
        while not pathlib.Path({str(go_on)!r}).exists():
            if time.time() > deadline:
                sys.exit(3)
            time.sleep(0.05)
        print("a warning", file=sys.stderr, flush=True)
        print("epoch 2")
        print("summary line")
        sys.exit(5)
    """)
    logger = logging.getLogger("test-streaming")
    logger.setLevel(logging.INFO)
    collect = Collect()
    logger.addHandler(collect)
    try:
        def release():
            if collect.first_line.wait(60):
                go_on.touch()

        releaser = threading.Thread(target=release)
        releaser.start()
        done = run_streamed([sys.executable, "-c", child], logger, prefix="[w0] ")
        releaser.join()
    finally:
        logger.removeHandler(collect)
    assert done.returncode == 5
    assert done.stdout_tail == ["epoch 1", "epoch 2", "summary line"] and done.stderr_tail == ["a warning"]
    by_level = {(r.levelno, r.getMessage()) for r in collect.records}
    assert (logging.WARNING, "[w0] a warning") in by_level
    assert [r.getMessage() for r in collect.records if r.levelno == logging.INFO] == [
        "[w0] epoch 1", "[w0] epoch 2", "[w0] summary line"]
