"""Run a command and pass its output to a logger line by line as it comes (a Prefect flow run's
logger: the UI shows a long `dvc exp run` or a tuning worker live, not only when it ends)."""

from __future__ import annotations

import collections
import logging
import subprocess
import threading
from dataclasses import dataclass

TAIL_LINES = 200


@dataclass
class Finished:
    returncode: int
    stdout_tail: list[str]   # the last TAIL_LINES lines of each stream, for the caller's summary or error
    stderr_tail: list[str]


def run_streamed(command: list[str], logger: logging.Logger | logging.LoggerAdapter, prefix: str = "",
                 **popen_kwargs) -> Finished:
    """Run ``command``; log each stdout line at INFO and each stderr line at WARNING as it is
    written (``prefix`` before each, e.g. which worker). Returns the exit status and both tails."""
    tails: dict[str, collections.deque[str]] = {"stdout": collections.deque(maxlen=TAIL_LINES),
                                                 "stderr": collections.deque(maxlen=TAIL_LINES)}
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
                          errors="replace", **popen_kwargs) as process:

        def pump(stream, name: str, level: int) -> None:
            for line in stream:
                line = line.rstrip("\n")
                tails[name].append(line)
                if line.strip():
                    logger.log(level, "%s%s", prefix, line)

        # Two readers: a child that fills one pipe while the other is read would otherwise block.
        readers = [threading.Thread(target=pump, args=(process.stdout, "stdout", logging.INFO), daemon=True),
                   threading.Thread(target=pump, args=(process.stderr, "stderr", logging.WARNING), daemon=True)]
        for reader in readers:
            reader.start()
        returncode = process.wait()
        for reader in readers:
            reader.join()
    return Finished(returncode, list(tails["stdout"]), list(tails["stderr"]))
