"""What the service keeps for review: every referred answer and a random ``review.sample_rate`` of
the others, written to the review queue (``tumorscope.review.queue``) by one background thread, so
a request never waits for the disk and a failing disk never fails a request (it is counted, and
``/health`` reports it)."""

from __future__ import annotations

import logging
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from tumorscope.review.queue import ReviewQueue, iso_utc

LOG = logging.getLogger(__name__)
PRUNE_EVERY = 200  # items added between two prunings of the queue's bounds


class ReviewIntake:
    def __init__(self, cfg: Any, seed: int | None = None):
        self.queue = ReviewQueue(cfg.queue_dir, cfg.max_items, cfg.max_age_days)
        self.sample_rate = cfg.sample_rate
        self._random = random.Random(seed)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="review-queue")
        self._lock = threading.Lock()
        self.counts = {"referred": 0, "sampled": 0, "failed": 0}
        self.last_error: str | None = None

    def why(self, response: dict[str, Any]) -> str | None:
        """"referred", "sampled" or None (not kept)."""
        if response.get("refer"):
            return "referred"
        with self._lock:
            return "sampled" if self._random.random() < self.sample_rate else None

    def submit(self, pixels: np.ndarray | None, response: dict[str, Any]) -> str | None:
        """Queue the slice in the background if it is to be reviewed; returns why (or None)."""
        why = self.why(response) if pixels is not None else None
        if why is not None:
            self._pool.submit(self._add, np.array(pixels, dtype=np.uint8), dict(response), why)
        return why

    def _add(self, pixels: np.ndarray, response: dict[str, Any], why: str) -> None:
        from tumorscope.review.queue import item_id

        try:
            if self.queue.contains(item_id(pixels)):
                return  # the same slice again: one item, counted once
            self.queue.add(pixels, response, response["model_version"], response["request_id"], why)
            with self._lock:
                self.counts[why] += 1
                due = sum(self.counts[k] for k in ("referred", "sampled")) % PRUNE_EVERY == 0
            if due:
                self.queue.prune()
        except Exception as err:  # the answer was given; the reading is what is lost, and it is reported
            with self._lock:
                self.counts["failed"] += 1
                self.last_error = f"{type(err).__name__}: {err}"[:300]
            LOG.warning("review queue: %s not kept: %s", response.get("request_id"), self.last_error)

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {"ok": self.counts["failed"] == 0, "queue_dir": str(self.queue.folder), **self.counts,
                    "last_error": self.last_error}

    def close(self) -> None:
        """Write what is queued (the writer would die with the process)."""
        self._pool.shutdown(wait=True)


def item_summary(item: Any) -> dict[str, Any]:
    """A queue item as the review routes list it (``contract.ReviewItemSummary``)."""
    answer = item.record["answer"]
    return {"item": item.id, "received_at": iso_utc(item.record["received_at"]), "why": item.record["why"],
            "model_version": item.record["model_version"], "model_class": answer.get("class"),
            "refer_reason": answer.get("refer_reason"), "label": item.label, "n_readings": len(item.labels)}


def item_detail(queue: ReviewQueue, item: Any) -> dict[str, Any]:
    """An item with its slice and readings (``contract.ReviewItem``)."""
    import base64

    answer = item.record["answer"]
    png = queue.slice_png(item.id)
    return item_summary(item) | {
        "request_id": item.record["request_id"], "classes": item.record["classes"],
        "probabilities": answer.get("probabilities", {}), "prediction_set": answer.get("prediction_set"),
        "readings": [reading | {"at": iso_utc(reading["at"])} for reading in item.labels],
        "slice_png_base64": base64.b64encode(png).decode("ascii")}
