"""Readings become data: the labelled items of the review queue written as a class-per-folder
batch under ``data.added_dir`` that ingest, validation, the grouped split and a ``dvc exp``
retraining take like any labelled batch, with a provenance table beside it.

A slice whose perceptual hash is within ``split.phash_threshold`` of a training slice is not put in
the batch (it would be trained on twice, and near-copies of one series must stay in one split): it
is listed in the provenance table as excluded, with its distance. So is a slice read as
``cannot assess``.
"""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

from tumorscope.errors import UserError
from tumorscope.review.queue import CANNOT_ASSESS, ReviewQueue, iso_utc

PROVENANCE_FILE = "provenance.csv"
PROVENANCE_COLUMNS = ("item", "label", "included", "why_excluded", "reviewer", "labelled_at", "model_version",
                      "model_answer", "why_queued", "received_at", "nearest_training_distance")


def harvest(queue: ReviewQueue, added_dir: str | Path, batch_name: str,
            training_phashes: list[str] | None, phash_threshold: int) -> tuple[Path, dict]:
    """Write every read item not harvested yet to ``added_dir/<batch_name>/<class>/<item>.png`` plus
    ``provenance.csv`` (one row per item, included or not), and mark them harvested; returns
    (folder, counts). The batch folder is written beside its final name and renamed when complete."""
    import numpy as np

    from tumorscope.data.manifest import phash_hex
    from tumorscope.data.split import nearest_distances

    batch = Path(added_dir) / batch_name
    if batch.exists():
        raise UserError(f"{batch} exists: choose another batch name (a harvested batch is never overwritten)")
    labelled = queue.items("labelled")
    if not labelled:
        raise UserError(f"nothing to harvest: no labelled item in {queue.folder} that is not harvested yet")
    hashes = [phash_hex(queue.pixels(item.id)) for item in labelled]
    distances = (nearest_distances(hashes, training_phashes) if training_phashes
                 else np.full(len(labelled), np.iinfo(np.int64).max))
    work = batch.with_name(f".{batch.name}.partial")
    rows: list[dict] = []
    counts: Counter[str] = Counter()
    for item, distance in zip(labelled, distances, strict=True):
        reading = item.labels[-1]
        near = bool(training_phashes) and int(distance) <= phash_threshold
        why = ("cannot assess" if reading["label"] == CANNOT_ASSESS else
               f"duplicate of a training slice (pHash distance {int(distance)} <= {phash_threshold})" if near else "")
        if not why:
            target = work / reading["label"] / f"{item.id}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(queue.slice_png(item.id))
            counts[reading["label"]] += 1
        else:
            counts["excluded"] += 1
        rows.append({"item": item.id, "label": reading["label"], "included": not why, "why_excluded": why,
                     "reviewer": reading["reviewer"], "labelled_at": iso_utc(reading["at"]),
                     "model_version": reading["model_version"], "model_answer": item.record["answer"].get("class"),
                     "why_queued": item.record["why"], "received_at": iso_utc(item.record["received_at"]),
                     "nearest_training_distance": "" if not training_phashes else int(distance)})
    if not any(row["included"] for row in rows):
        raise UserError(f"nothing to harvest: all {len(rows)} labelled items are excluded "
                        f"({', '.join(sorted({r['why_excluded'].split(' (')[0] for r in rows}))})")
    work.mkdir(parents=True, exist_ok=True)
    with open(work / PROVENANCE_FILE, "w", newline="", encoding="utf-8") as out:
        writer = csv.DictWriter(out, fieldnames=PROVENANCE_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    work.rename(batch)
    # Every read item is settled, included or not: none is harvested twice.
    queue.mark_harvested([row["item"] for row in rows], batch.name)
    return batch, dict(counts)
