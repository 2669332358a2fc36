"""Servers the tests start: a free loopback port, waiting until one answers, stopping it whole."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from tumorscope.runtime import free_port  # noqa: F401  (the one helper, re-exported for the tests)


def output_of(process: subprocess.Popen, log: Path | None) -> str:
    if log is not None and log.exists():
        return log.read_text(errors="replace")[-3000:]
    if process.stdout is not None and process.poll() is not None:
        return str(process.stdout.read())[-3000:]
    return ""


def wait_until(check: Callable[[], bool], seconds: float, what: str, process: subprocess.Popen | None = None,
               log: Path | None = None, every: float = 0.5) -> None:
    """Poll ``check`` (an OSError counts as not yet) until it is true; fail at once if ``process``
    exits, and after ``seconds``, with the process's output."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"{what}: process exited {process.returncode}:\n{output_of(process, log)}")
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(every)
    raise AssertionError(f"timed out after {seconds:g} s waiting for {what}" +
                         (f":\n{output_of(process, log)}" if process is not None else ""))


def answers_200(url: str) -> Callable[[], bool]:
    def check() -> bool:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200

    return check


def start(command: list[str], log: Path, env: dict | None = None, cwd: Path | None = None) -> subprocess.Popen:
    """Start a server in a session of its own (stopped with every worker process it starts),
    its output in ``log``."""
    with log.open("wb") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)


def children_of(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (Linux /proc; empty elsewhere)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def stop(process: subprocess.Popen | None, grace: float = 30) -> None:
    """SIGTERM the process's group (it stops its workers); SIGKILL the group and the children that
    left it (BentoML's workers run in process groups of their own) after ``grace`` seconds."""
    if process is None or process.poll() is not None:
        return
    children = children_of(process.pid)
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:  # not a group leader: a plain process
        process.terminate()
    try:
        process.wait(timeout=grace)
        return
    except subprocess.TimeoutExpired:
        pass
    for pid in children:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:  # already gone
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        process.kill()
    process.wait(timeout=10)
