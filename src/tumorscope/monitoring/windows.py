"""The current window: the newest rows of the service's inference log, or a folder of new slices.

Nothing is dropped silently: every line or file that does not enter the window is counted under
the reason it was left out, and the counts travel with the window into the drift summary.
"""

from __future__ import annotations

import json
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tumorscope.monitoring.features import (
    EMBEDDING_PREFIX,
    IMAGE_FEATURES,
    TRUST_COLUMNS,
    embedding_columns,
    feature_frame,
    model_outputs,
)
from tumorscope.monitoring.log_files import lines_newest_first, log_streams


@dataclass
class Window:
    """Feature rows of one window and what was left out of it (reason -> count)."""

    frame: pd.DataFrame
    source: str
    left_out: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)  # a few left-out lines or files with their reason
    # Older inference-log bytes and whole files a check did not need to read (older than the window).
    not_read: Counter = field(default_factory=Counter)

    def leave_out(self, reason: str, where: str, limit: int = 5) -> None:
        self.left_out[reason] += 1
        if len(self.examples) < limit:
            self.examples.append(f"{where}: {reason}")


def _record_problem(record: Any, dims: int) -> str | None:
    """Why a parsed log line cannot be a window row (None when it can)."""
    if not isinstance(record, dict):
        return "not a JSON object"
    for key, kind in (("model_version", str), ("predicted_class", str), ("probabilities", dict), ("image", dict),
                      ("embedding", list)):
        if not isinstance(record.get(key), kind):
            return f"no {key}"
    if len(record["embedding"]) != dims:
        return f"embedding of {len(record['embedding'])} values, not serve.embedding_dims={dims}"
    try:
        [float(v) for v in record["probabilities"].values()]
        [float(v) for v in record["embedding"]]
    except (TypeError, ValueError):
        return "non-numeric probabilities or embedding"
    return None


def _log_row(record: dict) -> dict[str, Any]:
    image = record["image"]
    row: dict[str, Any] = {}
    for name in IMAGE_FEATURES:
        value = image.get(name)
        row[name] = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else np.nan
    row["predicted_class"] = record["predicted_class"]
    # The network's own confidence, as the reference's (a log written before calibration has only "probabilities").
    raw = record.get("raw_probabilities")
    own: dict = raw if isinstance(raw, dict) else record["probabilities"]
    row["confidence"] = max(float(v) for v in own.values())
    row.update({f"{EMBEDDING_PREFIX}{i}": float(v) for i, v in enumerate(record["embedding"])})
    for name in TRUST_COLUMNS:  # absent or null: a model without a trust state, or an older log
        row[name] = float(record[name]) if isinstance(record.get(name), bool) else np.nan
    return row


def _without_repeats(records, window: Window) -> deque[dict]:
    """The window with each uploaded file once (its newest record): a slice classified and then
    explained, or sent twice, is one slice of the population monitoring compares."""
    seen: set[str] = set()
    kept: deque[dict] = deque()
    for record in reversed(records):
        digest = record.get("sha256")
        if isinstance(digest, str) and digest in seen:
            window.left_out["repeat of a file already in the window (same SHA-256)"] += 1
            continue
        if isinstance(digest, str):
            seen.add(digest)
        kept.appendleft(record)
    return kept


def _newest_rows(files: list[Path], model_version: str, size: int, embedding_dims: int,
                 window: Window) -> list[dict]:
    """Up to ``size`` rows of ``model_version`` from one replica's files (newest first), reading
    backwards and stopping once found; what is not read is counted in ``window.not_read``."""
    rows: list[dict] = []
    for index, path in enumerate(files):
        for offset, raw in lines_newest_first(path):
            where = f"{path} (byte {offset})"
            try:
                record = json.loads(raw)
            except (ValueError, UnicodeDecodeError):
                window.leave_out("corrupt line (not JSON)", where)
                continue
            problem = _record_problem(record, embedding_dims)
            if problem is not None:
                window.leave_out(f"corrupt line ({problem})", where)
                continue
            if record["model_version"] != model_version:
                window.leave_out(f"another model version ({record['model_version']})", where)
                continue
            rows.append(record)
            if len(rows) == size:  # everything before this line, and the older files, stays unread
                window.not_read["bytes"] += offset + sum(older.stat().st_size for older in files[index + 1:])
                window.not_read["files"] += len(files) - index - 1
                return rows
    return rows


def read_log_window(path: str | Path, model_version: str, size: int, embedding_dims: int) -> Window:
    """The newest ``size`` rows written by ``model_version`` (e.g. ``tumorscope-kidney-ct/3``) in the
    inference log ``path``: the file, its rotated files and the other replicas' (``log_files``).

    Each replica's files are read from their end and only until the window is full, so a check
    costs about the same on a 10 MB and a 1 GB log; the bytes and files left unread (older than
    the window) are counted in ``not_read``. Among what was read, a corrupt line (a crash
    mid-write, an edit by hand), a row of another model version, a row older than the window or a
    repeat of a file already in it is counted, not read into the window. Replicas' rows are merged
    by timestamp. A log not written yet is an empty window."""
    path = Path(path)
    window = Window(pd.DataFrame(), f"inference log {path}")
    streams = log_streams(path)
    if not streams:
        window.leave_out("no inference log yet", str(path))
        return window
    found = [_newest_rows(files, model_version, size, embedding_dims, window) for files in streams.values()]
    if len(found) == 1:
        newest_first = found[0]
    else:  # several replicas: their rows interleave in time
        newest_first = sorted((r for rows in found for r in rows), key=lambda r: str(r.get("timestamp", "")), reverse=True)
        window.source += f" ({len(found)} replicas)"
    if len(newest_first) > size:
        window.left_out[f"older than the window of {size} rows"] += len(newest_first) - size
    newest = _without_repeats(list(reversed(newest_first[:size])), window)
    columns = [*IMAGE_FEATURES, "predicted_class", "confidence", *embedding_columns(embedding_dims), *TRUST_COLUMNS]
    window.frame = pd.DataFrame([_log_row(r) for r in newest], columns=columns)
    return window


def folder_window(files: list[Path], champion, embedding_dims: int, source: str) -> Window:
    """Rows of a folder's slices, decoded and prepared as the model's training cache was
    (``inference.prepare_file``), with ``champion``'s (an ``inference.LoadedModel``) answers and
    referrals; an unreadable file is counted with its reason."""
    from tumorscope.data.images import UnreadableImage
    from tumorscope.inference import prepare_file, stack

    window = Window(pd.DataFrame(), source)
    prepared = []
    for path in files:
        try:
            one = prepare_file(path, champion.spec)
        except (OSError, UnreadableImage) as err:
            window.leave_out(f"unreadable file ({str(err).splitlines()[0][:120]})", str(path))
            continue
        one.decoded = one.view = None  # a full-size slice is not needed any more
        prepared.append(one)
    images = stack(prepared, champion.image_size)
    probabilities, embeddings = model_outputs(champion.model, images, embedding_dims)
    _, judged = champion.answers(images)
    window.frame = feature_frame(images, np.array([p.original_shape for p in prepared]).reshape(-1, 2),
                                 [p.source_mode for p in prepared], probabilities, champion.classes, embeddings, judged)
    return window
