"""A queue of slices for a radiologist to read, kept as files that several service replicas may
write at once and that survive a restart.

An item is the decoded slice as 8-bit greyscale pixels (a PNG: no DICOM tag, no file name, nothing
that names a patient) with the model's answer, its version and the request id. It is addressed by
its content: the same pixels twice are one item, whoever writes them first. A reading is appended
to the item's label history, never rewritten: the current label is the last line, and who changed
it, when and from what stays readable. Unlabelled items are dropped oldest first beyond
``review.max_items`` and after ``review.max_age_days``; a labelled item is kept until it is
harvested into the training data.

Layout under ``review.queue_dir``: ``items/<id>.png`` and ``items/<id>.json`` (the answer),
``labels/<id>.jsonl`` (the readings), ``harvested/<id>.json`` (the batch a read item went into: it
is not harvested again, and may then be dropped like an unlabelled one, its slice being in the data).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tumorscope.errors import UserError

CANNOT_ASSESS = "cannot assess"
ITEM_ID_CHARS = 24
# What an item keeps of the model's answer (the service's classify answer has more).
ANSWER_FIELDS = ("class", "probabilities", "prediction_set", "refer", "refer_reason", "orientation", "critical_probability")


class UnknownItem(UserError):
    """No item of that id in the queue."""


class BadLabel(UserError):
    """A label that is not one of the model's classes or ``cannot assess``."""


def item_id(pixels: np.ndarray) -> str:
    """The content address of a slice: SHA-256 of its shape and pixels (24 hex characters)."""
    pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
    digest = hashlib.sha256(f"{pixels.shape}".encode() + pixels.tobytes()).hexdigest()
    return digest[:ITEM_ID_CHARS]


def png_bytes(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8), "L").save(buffer, format="PNG")
    return buffer.getvalue()


def iso_utc(seconds: float) -> str:
    """A queue time (seconds since the epoch) as UTC ISO 8601."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def _write_atomic(path: Path, data: bytes) -> None:
    """Write beside ``path`` and rename: a reader never sees half a file, a kill leaves none."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}.partial")
    partial.write_bytes(data)
    partial.replace(path)


@dataclass(frozen=True)
class Item:
    id: str
    record: dict[str, Any]        # received_at, why, model_version, request_id, answer, shape
    labels: list[dict[str, Any]]  # the readings, oldest first
    harvested: dict[str, Any] | None = None  # the batch it went into

    @property
    def label(self) -> str | None:
        return self.labels[-1]["label"] if self.labels else None

    @property
    def status(self) -> str:
        """pending (no reading), labelled (read, not harvested yet) or harvested."""
        return "harvested" if self.harvested else "pending" if not self.labels else "labelled"


class ReviewQueue:
    def __init__(self, folder: str | Path, max_items: int = 10_000, max_age_days: float = 90.0):
        self.folder = Path(folder)
        self.items_dir = self.folder / "items"
        self.labels_dir = self.folder / "labels"
        self.harvested_dir = self.folder / "harvested"
        self.max_items, self.max_age_days = max_items, max_age_days

    # -- writing

    def add(self, pixels: np.ndarray, answer: dict[str, Any], model_version: str, request_id: str, why: str,
            now: float | None = None) -> str:
        """Keep a slice for review (``why``: "referred" or "sampled"); returns its id. The same
        pixels again add nothing (the first answer is kept)."""
        pixels = np.asarray(pixels, dtype=np.uint8)
        if pixels.ndim == 3 and pixels.shape[-1] == 1:
            pixels = pixels[..., 0]
        if pixels.ndim != 2:
            raise ValueError(f"review queue: expected one greyscale slice, got shape {pixels.shape}")
        identifier = item_id(pixels)
        record_path = self.items_dir / f"{identifier}.json"
        if record_path.is_file():
            return identifier
        self.items_dir.mkdir(parents=True, exist_ok=True)
        if not answer.get("probabilities"):
            raise ValueError("review queue: the answer has no class probabilities")
        record = {"id": identifier, "received_at": time.time() if now is None else now, "why": why,
                  "model_version": model_version, "request_id": request_id, "shape": list(pixels.shape),
                  "classes": list(answer["probabilities"]),
                  "answer": {k: answer[k] for k in ANSWER_FIELDS if k in answer}}
        # The pixels first, then the record that names them: the record is the commit point.
        _write_atomic(self.items_dir / f"{identifier}.png", png_bytes(pixels))
        _write_atomic(record_path, json.dumps(record, sort_keys=True).encode())
        return identifier

    def label(self, identifier: str, label: str, reviewer: str, model_version: str | None = None,
              now: float | None = None) -> Item:
        """Append a reading to the item's history (a change of mind is a new line, the old one stays).
        ``label`` is one of the classes of the model that answered, or ``cannot assess``."""
        item = self.item(identifier)
        classes = item.record["classes"]
        if label not in (*classes, CANNOT_ASSESS):
            raise BadLabel(f"label {label!r} is not one of the classes ({', '.join(classes)}) or {CANNOT_ASSESS!r}")
        entry = {"label": label, "reviewer": reviewer, "at": time.time() if now is None else now,
                 "model_version": model_version or item.record["model_version"], "previous": item.label}
        self.labels_dir.mkdir(parents=True, exist_ok=True)
        # One short line appended with O_APPEND: concurrent readings of one item interleave whole lines.
        with open(self.labels_dir / f"{identifier}.jsonl", "a", encoding="utf-8") as history:
            history.write(json.dumps(entry, sort_keys=True) + "\n")
        return Item(item.id, item.record, [*item.labels, entry])

    def mark_harvested(self, identifiers: list[str], batch: str, now: float | None = None) -> None:
        self.harvested_dir.mkdir(parents=True, exist_ok=True)
        for identifier in identifiers:
            _write_atomic(self.harvested_dir / f"{identifier}.json",
                          json.dumps({"batch": batch, "at": time.time() if now is None else now}).encode())

    def prune(self, now: float | None = None) -> int:
        """Drop unlabelled (and harvested) items past ``max_age_days``, then the oldest of them
        beyond ``max_items``; returns how many went. Read items not harvested yet stay."""
        now = time.time() if now is None else now
        items = self.items()  # oldest first
        pending = [i for i in items if i.status in ("pending", "harvested")]
        too_old = [i for i in pending if now - i.record["received_at"] > self.max_age_days * 86_400]
        kept = [i for i in pending if i not in too_old]
        labelled = len(items) - len(pending)
        over = max(0, len(kept) + labelled - self.max_items)
        dropped = too_old + kept[:over]
        for item in dropped:
            self.remove(item.id)
        return len(dropped)

    def remove(self, identifier: str) -> None:
        for path in (self.items_dir / f"{identifier}.json", self.items_dir / f"{identifier}.png",
                     self.labels_dir / f"{identifier}.jsonl", self.harvested_dir / f"{identifier}.json"):
            path.unlink(missing_ok=True)

    # -- reading

    def contains(self, identifier: str) -> bool:
        return (self.items_dir / f"{identifier}.json").is_file()

    def item(self, identifier: str) -> Item:
        if len(identifier) != ITEM_ID_CHARS or any(c not in "0123456789abcdef" for c in identifier):
            raise UnknownItem(f"no review item {identifier!r} (ids are {ITEM_ID_CHARS} hexadecimal characters)")
        try:
            record = json.loads((self.items_dir / f"{identifier}.json").read_text())
        except FileNotFoundError:
            raise UnknownItem(f"no review item {identifier!r} in {self.items_dir}") from None
        return Item(identifier, record, self._labels(identifier), self._harvested(identifier))

    def slice_png(self, identifier: str) -> bytes:
        """The item's slice as stored (an 8-bit greyscale PNG)."""
        return (self.items_dir / f"{identifier}.png").read_bytes()

    def pixels(self, identifier: str) -> np.ndarray:
        from PIL import Image

        self.item(identifier)
        with Image.open(self.items_dir / f"{identifier}.png") as image:
            return np.asarray(image.convert("L"))

    def items(self, status: str = "all") -> list[Item]:
        """Every item (``status``: "all", "pending", "labelled" or "harvested"), oldest first."""
        if not self.items_dir.is_dir():
            return []
        found = []
        for path in self.items_dir.glob("*.json"):
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError):
                continue  # removed or being replaced as we read: not an item now
            found.append(Item(path.stem, record, self._labels(path.stem), self._harvested(path.stem)))
        found.sort(key=lambda i: (i.record["received_at"], i.id))
        return [i for i in found if status == "all" or i.status == status]

    def _harvested(self, identifier: str) -> dict[str, Any] | None:
        try:
            return json.loads((self.harvested_dir / f"{identifier}.json").read_text())
        except (FileNotFoundError, ValueError):
            return None

    def _labels(self, identifier: str) -> list[dict[str, Any]]:
        try:
            lines = (self.labels_dir / f"{identifier}.jsonl").read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in lines if line.strip()]
