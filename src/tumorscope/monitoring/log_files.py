"""The files of one inference log: the live file, its rotated predecessors, and one such set per
replica when several service replicas share the folder.

For ``serve.inference_log: logs/inference.jsonl``:

* one replica writes ``logs/inference.jsonl`` and rotates it by size to ``inference.jsonl.1`` (the
  newest rotated file) ... ``inference.jsonl.<backups>`` (the oldest; older ones are deleted);
* a replica with an id (``$TUMORSCOPE_REPLICA_ID`` or ``serve.replica_id``) writes
  ``logs/inference.<id>.jsonl`` and rotates it the same way, so replicas never write one file.

Monitoring reads every set the folder holds, newest rows first (``lines_newest_first``), and stops
once it has its window: a check costs the size of the window, not of the log.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

from tumorscope.errors import UserError

REPLICA_ENV = "TUMORSCOPE_REPLICA_ID"
_REPLICA = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}")
READ_BLOCK = 1 << 20


def replica_id(configured: str | None, environ: Mapping[str, str] | None = None) -> str | None:
    """$TUMORSCOPE_REPLICA_ID, else ``serve.replica_id``; None for a single replica. Letters, digits,
    ``-`` and ``_`` (it becomes part of a file name)."""
    environ = os.environ if environ is None else environ
    found = environ.get(REPLICA_ENV) or configured
    if found is None:
        return None
    if not _REPLICA.fullmatch(found):
        source = REPLICA_ENV if environ.get(REPLICA_ENV) else "serve.replica_id"
        raise UserError(f"{source}: {found!r} is not a replica id (1-63 letters, digits, '-' or '_', "
                        "starting with a letter or digit)")
    return found


def live_path(base: Path, replica: str | None) -> Path:
    """The file a replica appends to."""
    return base if replica is None else base.with_name(f"{base.stem}.{replica}{base.suffix}")


def rotated_path(path: Path, n: int) -> Path:
    return path.with_name(f"{path.name}.{n}")


def rotate(path: Path, backups: int) -> None:
    """``path`` becomes ``path.1``, ``path.1`` becomes ``path.2`` ...; ``path.<backups>`` is deleted."""
    rotated_path(path, backups).unlink(missing_ok=True)
    for n in range(backups - 1, 0, -1):
        older = rotated_path(path, n)
        if older.exists():
            older.replace(rotated_path(path, n + 1))
    path.replace(rotated_path(path, 1))


def log_streams(base: Path) -> dict[str | None, list[Path]]:
    """Replica (None: the unnamed one) -> its existing files, newest first."""
    pattern = re.compile(rf"{re.escape(base.stem)}(?:\.(?P<replica>{_REPLICA.pattern}))?{re.escape(base.suffix)}"
                         r"(?:\.(?P<n>[1-9][0-9]*))?")
    found: dict[str | None, list[tuple[int, Path]]] = {}
    if not base.parent.is_dir():
        return {}
    for entry in base.parent.iterdir():
        match = pattern.fullmatch(entry.name)
        if match and entry.is_file():
            found.setdefault(match["replica"], []).append((int(match["n"] or 0), entry))
    return {replica: [p for _, p in sorted(files)] for replica, files in sorted(found.items(), key=lambda kv: kv[0] or "")}


def lines_newest_first(path: Path, block: int = READ_BLOCK) -> Iterator[tuple[int, bytes]]:
    """(byte offset, line) of ``path`` from its last line to its first, reading ``block`` bytes at a
    time from the end; empty lines are skipped. A last line without its newline (a write cut short)
    comes first, like any other."""
    with path.open("rb") as file:
        position = file.seek(0, os.SEEK_END)
        carry = b""  # the start of a line whose beginning is in an earlier block
        while position > 0:
            start = max(0, position - block)
            file.seek(start)
            chunk = file.read(position - start) + carry
            lines = chunk.split(b"\n")
            carry = lines[0]
            offset = start + len(chunk)
            for line in reversed(lines[1:]):
                offset -= len(line) + 1
                if line.strip():
                    yield offset + 1, line
            position = start
        if carry.strip():
            yield 0, carry
