"""The inference log: one JSON line per answer, written by a background thread that never blocks or
fails a request (drift monitoring reads it)."""

from __future__ import annotations

import json
import queue
import threading
import time
from pathlib import Path
from typing import Any

from tumorscope.api.refusals import one_line
from tumorscope.reports import utc_now


def inference_record(endpoint: str, response: dict[str, Any], data: bytes) -> dict[str, Any]:
    """One inference-log line: what monitoring needs, without the file name (it may name a patient)
    and without pixels; the SHA-256 of the bytes links repeated uploads of one file."""
    import hashlib

    return {"timestamp": utc_now(), "endpoint": endpoint, "request_id": response["request_id"],
            "model_version": response["model_version"], "predicted_class": response["class"],
            "probabilities": response["probabilities"], "alert": response["alert"], "image": response["image"],
            "embedding": response["embedding"], "sha256": hashlib.sha256(data).hexdigest()} | {
        # What the answer said about trusting it (null for a model without a trust state).
        key: response.get(key) for key in ("raw_probabilities", "prediction_set", "refer", "refer_reason", "ood",
                                           "ood_distance", "orientation")}


class InferenceLog:
    """JSON lines appended to ``path`` by one background thread.

    ``submit`` never blocks and never raises: a full queue drops the record and counts it, a write
    that fails (unwritable folder, full disk: any OSError) counts its records and keeps the last
    error. ``status()`` is what the health endpoint reports. The file is opened per write batch, so a
    deleted log is recreated. With ``max_bytes``, a write that would take the file past it rotates
    it first (``log_files.rotate``: ``path.1`` the newest of ``backups`` rotated files), so the log
    never holds much more than ``(backups + 1) * max_bytes``. Every line carries ``replica``."""

    def __init__(self, path: str | Path, max_queue: int = 10_000, autostart: bool = True, max_bytes: int | None = None,
                 backups: int = 10, replica: str | None = None):
        self.path = Path(path)
        self.max_bytes, self.backups, self.replica = max_bytes, backups, replica
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue(maxsize=max_queue)
        self._lock = threading.Lock()
        self.written = 0
        self.dropped = 0  # queue full
        self.failed = 0  # records lost to failed writes
        self.last_error: str | None = None
        self.last_error_at: str | None = None
        self._thread: threading.Thread | None = None
        if autostart:
            self.start()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="inference-log", daemon=True)
            self._thread.start()

    def submit(self, record: dict[str, Any]) -> bool:
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            with self._lock:
                self.dropped += 1
                self.last_error = f"queue full ({self._queue.maxsize} records waiting): record dropped"
                self.last_error_at = utc_now()
            return False
        return True

    def _run(self) -> None:
        while True:
            record = self._queue.get()
            batch, stop = [], record is None
            if record is not None:
                batch.append(record)
            while not stop and len(batch) < 256:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                else:
                    batch.append(more)
            try:
                if batch:
                    self._write(batch)
            finally:
                for _ in range(len(batch) + (1 if stop else 0)):
                    self._queue.task_done()
            if stop:
                return

    def _write(self, records: list[dict[str, Any]]) -> None:
        lines, bad = [], 0
        for record in records:
            try:
                lines.append(json.dumps(record | {"replica": self.replica}, allow_nan=False, default=str) + "\n")
            except (TypeError, ValueError) as err:  # NaN, a circular value: lose the record, keep the rest
                bad += 1
                self._failed(1, err)
        if not lines:
            return
        payload = "".join(lines).encode("utf-8")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._rotate_before(len(payload))
            with self.path.open("ab") as file:
                file.write(payload)
        except Exception as err:  # OSError above all (ENOSPC, EACCES, ENOTDIR); the thread must never die
            self._failed(len(lines), err)
            return
        with self._lock:
            self.written += len(lines)

    def _rotate_before(self, incoming: int) -> None:
        """Rotate when ``incoming`` bytes would take a non-empty file past ``max_bytes``. A failed
        rotation is reported and the records are still appended (a longer file, nothing lost)."""
        if self.max_bytes is None:
            return
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return
        if size and size + incoming > self.max_bytes:
            from tumorscope.monitoring.log_files import rotate

            try:
                rotate(self.path, self.backups)
            except OSError as err:
                with self._lock:
                    self.last_error = one_line(f"rotation failed: {type(err).__name__}: {err}")
                    self.last_error_at = utc_now()

    def _failed(self, n: int, err: BaseException) -> None:
        with self._lock:
            self.failed += n
            self.last_error = one_line(f"{type(err).__name__}: {err}")
            self.last_error_at = utc_now()

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every submitted record is written or has failed; False on timeout."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    def close(self, timeout: float = 5.0) -> None:
        if self._thread is None:
            return
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            return
        self._thread.join(timeout)
        self._thread = None

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {"path": str(self.path), "replica": self.replica, "ok": self.failed == 0 and self.dropped == 0, "written": self.written,
                    "dropped_queue_full": self.dropped, "failed": self.failed, "queued": self._queue.qsize(),
                    "last_error": self.last_error, "last_error_at": self.last_error_at}


