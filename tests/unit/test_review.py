"""The review queue: content-addressed items that carry nothing that names a patient, readings kept
with their history, bounds that never drop a reading, writers in several processes, Label Studio's
formats both ways, and the harvest into a labelled batch that excludes what the data already has."""

from __future__ import annotations

import io
import json
import multiprocessing
from pathlib import Path

import numpy as np
import pytest

from helpers.params import section
from tumorscope.errors import UserError
from tumorscope.review.harvest import harvest
from tumorscope.review.labelstudio import export_tasks, import_annotations, label_config
from tumorscope.review.queue import CANNOT_ASSESS, BadLabel, ReviewQueue, UnknownItem, item_id

CLASSES = ["Cyst", "Normal", "Stone", "Tumor"]


def answer(predicted: str = "Tumor", refer_reason: str | None = "prediction set holds 2 classes") -> dict:
    probabilities = {c: (0.7 if c == predicted else 0.1) for c in CLASSES}
    return {"class": predicted, "probabilities": probabilities, "prediction_set": [predicted, "Cyst"],
            "refer": refer_reason is not None, "refer_reason": refer_reason, "orientation": "axial",
            "image": {"mean": 60.0}, "embedding": [0.1, 0.2]}


def slices(n: int, seed: int = 0, size: int = 32) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size), dtype=np.uint8) for _ in range(n)]


def test_the_same_slice_twice_is_one_item_and_keeps_only_pixels_and_the_answer(tmp_path):
    queue = ReviewQueue(tmp_path / "review")
    pixels = slices(1)[0]
    first = queue.add(pixels, answer(), "tumorscope-kidney-ct/3", "req-1", "referred", now=100.0)
    again = queue.add(pixels[..., None], answer("Cyst"), "tumorscope-kidney-ct/4", "req-2", "sampled", now=200.0)
    assert first == again == item_id(pixels) and len(queue.items()) == 1
    item = queue.item(first)
    assert item.status == "pending" and item.record["request_id"] == "req-1"  # the first answer is kept
    assert set(item.record["answer"]) == {"class", "probabilities", "prediction_set", "refer", "refer_reason",
                                          "orientation"}  # no embedding, no image statistics
    np.testing.assert_array_equal(queue.pixels(first), pixels)
    assert sorted(p.name for p in (tmp_path / "review" / "items").iterdir()) == [f"{first}.json", f"{first}.png"]


def test_readings_keep_their_history_and_bad_ones_are_refused_with_nothing_written(tmp_path):
    queue = ReviewQueue(tmp_path / "review")
    identifier = queue.add(slices(1)[0], answer(), "m/1", "r", "referred")
    queue.label(identifier, "Tumor", "dr-a", now=10.0)
    changed = queue.label(identifier, "Cyst", "dr-b", now=20.0)
    assert changed.label == "Cyst" and [r["label"] for r in changed.labels] == ["Tumor", "Cyst"]
    assert changed.labels[-1] | {} == {"label": "Cyst", "reviewer": "dr-b", "at": 20.0, "model_version": "m/1",
                                       "previous": "Tumor"}
    with pytest.raises(BadLabel, match="'Melanoma' is not one of the classes"):
        queue.label(identifier, "Melanoma", "dr-a")
    with pytest.raises(UnknownItem):
        queue.label("0" * 24, "Cyst", "dr-a")
    with pytest.raises(UnknownItem):
        queue.label("../../etc/passwd", "Cyst", "dr-a")  # not an id: never a path
    assert [r["label"] for r in queue.item(identifier).labels] == ["Tumor", "Cyst"]
    queue.label(identifier, CANNOT_ASSESS, "dr-c")
    assert queue.item(identifier).label == CANNOT_ASSESS


def test_bounds_drop_old_and_surplus_unlabelled_items_never_a_reading(tmp_path):
    queue = ReviewQueue(tmp_path / "review", max_items=3, max_age_days=1)
    ids = [queue.add(p, answer(), "m/1", f"r{i}", "sampled", now=1000.0 + i) for i, p in enumerate(slices(5))]
    queue.label(ids[0], "Normal", "dr-a")
    assert queue.prune(now=1000.0 + 10) == 2  # 5 items, 3 allowed: the two oldest unlabelled go
    assert [i.id for i in queue.items()] == [ids[0], ids[3], ids[4]]
    assert queue.prune(now=1000.0 + 2 * 86_400) == 2  # a day later: the unlabelled ones are too old
    assert [i.id for i in queue.items()] == [ids[0]] and queue.item(ids[0]).label == "Normal"


def _add_and_read(folder: str, seed: int) -> None:
    queue = ReviewQueue(folder)
    shared = slices(1, seed=99)[0]
    identifier = queue.add(shared, answer(), "m/1", f"worker-{seed}", "referred")
    for index in range(20):
        queue.label(identifier, CLASSES[(seed + index) % 4], f"dr-{seed}")
    queue.add(slices(1, seed=seed)[0], answer(), "m/1", f"worker-{seed}", "sampled")


def test_several_processes_write_one_queue_without_losing_or_tearing_anything(tmp_path):
    folder = str(tmp_path / "review")
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_add_and_read, args=(folder, seed)) for seed in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
        assert worker.exitcode == 0
    queue = ReviewQueue(folder)
    assert len(queue.items()) == 5  # the shared slice once, one own slice per process
    shared = queue.item(item_id(slices(1, seed=99)[0]))
    assert len(shared.labels) == 80 and {r["reviewer"] for r in shared.labels} == {f"dr-{s}" for s in range(4)}
    assert not list(Path(folder).rglob("*.partial"))


def test_a_dicom_slice_leaves_no_identifying_tag_in_the_queue(tmp_path):
    from pydicom import dcmread

    from helpers.images import phantom_dicom
    from tumorscope.config import WindowConfig
    from tumorscope.data.images import decode_greyscale

    data = io.BytesIO(phantom_dicom())
    ds = dcmread(data)
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = "Doe^Jane", "MRN-0042-7731", "19610203"
    ds.StudyDate, ds.AccessionNumber, ds.InstitutionName = "20261201", "ACC-55501", "St Example Hospital"
    ds.StudyInstanceUID = ds.SeriesInstanceUID = ds.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.424242"
    tagged = io.BytesIO()
    ds.save_as(tagged)
    pixels, mode = decode_greyscale(tagged.getvalue(), "scan-of-Doe-Jane.dcm", section(WindowConfig))
    assert mode == "DICOM"
    queue = ReviewQueue(tmp_path / "review")
    identifier = queue.add(pixels, answer(), "m/1", "req-1", "referred")
    queue.label(identifier, "Tumor", "dr-a")
    batch, _ = harvest(queue, tmp_path / "added", "reviewed-1", None, 4)
    tasks = json.dumps(export_tasks(queue, "all"))
    stored = b"".join(p.read_bytes() for p in [*(tmp_path / "review").rglob("*"), *batch.rglob("*")] if p.is_file())
    for secret in ("Doe", "Jane", "MRN-0042", "19610203", "20261201", "ACC-55501", "St Example", "424242"):
        assert secret.encode() not in stored and secret not in tasks, secret


def test_label_studio_tasks_and_annotations_round_trip(tmp_path):
    queue = ReviewQueue(tmp_path / "review")
    ids = [queue.add(p, answer(c), "m/7", f"r{i}", "referred") for i, (p, c) in enumerate(zip(slices(3), CLASSES[:3], strict=True))]
    tasks = export_tasks(queue)
    assert [t["data"]["item"] for t in tasks] == ids
    assert tasks[0]["data"]["image"].startswith("data:image/png;base64,")
    assert tasks[1]["predictions"][0]["result"][0]["value"] == {"choices": ["Normal"]}
    config = label_config(CLASSES)
    assert config.count("<Choice ") == 5 and f'value="{CANNOT_ASSESS}"' in config and 'name="class"' in config

    # What Label Studio's JSON export gives back for these tasks: the task data, each annotation's result.
    exported = [task | {"id": index + 1, "annotations": [{
        "id": 100 + index, "completed_by": {"id": 3, "email": "reader@hospital.example"}, "was_cancelled": False,
        "result": [{"from_name": "class", "to_name": "image", "type": "choices", "value": {"choices": [label]}}]}]}
        for index, (task, label) in enumerate(zip(tasks, ["Tumor", CANNOT_ASSESS, "Stone"], strict=True))]
    exported[2]["annotations"].append({"completed_by": 4, "was_cancelled": True, "result": []})
    exported.append({"data": {"item": "f" * 24}, "annotations": [{"completed_by": 3, "result": [
        {"from_name": "class", "to_name": "image", "type": "choices", "value": {"choices": ["Cyst"]}}]}]})
    outcome = import_annotations(queue, json.loads(json.dumps(exported)))
    assert outcome["applied"] == 3 and outcome["skipped"] == 1 and len(outcome["refused"]) == 1
    assert [queue.item(i).label for i in ids] == ["Tumor", CANNOT_ASSESS, "Stone"]
    assert queue.item(ids[0]).labels[-1]["reviewer"] == "label-studio:reader@hospital.example"

    # JSON-MIN: one flat row per annotation, the control's name as the key.
    minimal = [{"item": ids[0], "class": "Cyst", "annotator": "second@hospital.example", "id": 1}]
    assert import_annotations(queue, minimal)["applied"] == 1
    assert [r["label"] for r in queue.item(ids[0]).labels] == ["Tumor", "Cyst"]
    with pytest.raises(UserError, match="expected a JSON list of tasks"):
        import_annotations(queue, {"tasks": []})


def test_harvest_writes_a_class_per_folder_batch_and_excludes_duplicates_and_unreadable_slices(tmp_path):
    from tumorscope.data.manifest import phash_hex
    from tumorscope.data.split import nearest_distances

    queue = ReviewQueue(tmp_path / "review")
    pixels = slices(4, seed=3)
    ids = [queue.add(p, answer(), "m/2", f"r{i}", "referred" if i else "sampled") for i, p in enumerate(pixels)]
    queue.label(ids[0], "Tumor", "dr-a")
    queue.label(ids[1], "Cyst", "dr-a")
    queue.label(ids[1], "Stone", "dr-b")  # the last reading counts
    queue.label(ids[2], CANNOT_ASSESS, "dr-a")
    queue.label(ids[3], "Normal", "dr-a")
    training = [phash_hex(pixels[3]), phash_hex(slices(1, seed=50)[0])]  # slice 3 is already in the data
    assert nearest_distances([phash_hex(pixels[0])], training)[0] > 4  # and slice 0 is not near it
    batch, counts = harvest(queue, tmp_path / "added", "reviewed-1", training, 4)
    assert counts == {"Tumor": 1, "Stone": 1, "excluded": 2}
    assert sorted(str(p.relative_to(batch)) for p in batch.rglob("*.png")) == [f"Stone/{ids[1]}.png",
                                                                                 f"Tumor/{ids[0]}.png"]
    import pandas as pd

    rows = pd.read_csv(batch / "provenance.csv", keep_default_na=False).set_index("item")
    assert rows.loc[ids[1], "reviewer"] == "dr-b" and rows.loc[ids[1], "model_answer"] == "Tumor"
    assert rows.loc[ids[2], "why_excluded"] == "cannot assess"
    assert rows.loc[ids[3], "why_excluded"].startswith("duplicate of a training slice (pHash distance 0")
    assert rows.loc[ids[0], "why_queued"] == "sampled" and bool(rows.loc[ids[0], "included"])
    assert {item.status for item in queue.items()} == {"harvested"}  # settled: never harvested twice
    assert queue.item(ids[1]).harvested["batch"] == "reviewed-1"
    with pytest.raises(UserError, match="no labelled item"):
        harvest(queue, tmp_path / "added", "reviewed-2", training, 4)
    queue.label(ids[0], "Cyst", "dr-c")  # a later change of mind is kept, not harvested again
    assert queue.item(ids[0]).status == "harvested"
    with pytest.raises(UserError, match="exists: choose another batch name"):
        harvest(ReviewQueue(tmp_path / "again"), tmp_path / "added", "reviewed-1", training, 4)
    with pytest.raises(UserError, match="no labelled item"):
        harvest(ReviewQueue(tmp_path / "empty"), tmp_path / "added", "reviewed-2", None, 4)


def test_the_service_keeps_referred_answers_and_a_sample_and_survives_a_failing_disk(tmp_path):
    from tumorscope.api.review_intake import ReviewIntake
    from tumorscope.config import ReviewConfig

    def response(i: int, refer: bool) -> dict:
        return answer(refer_reason="unlike the training slices" if refer else None) | {
            "refer": refer, "model_version": "m/1", "request_id": f"req-{i}"}

    intake = ReviewIntake(section(ReviewConfig, queue_dir=str(tmp_path / "review"), sample_rate=0.25), seed=0)
    pixels = slices(400, seed=4)
    whys = [intake.submit(p, response(i, refer=i < 10)) for i, p in enumerate(pixels)]
    intake.close()
    assert whys[:10] == ["referred"] * 10
    sampled = whys[10:].count("sampled")
    assert 0.15 * 390 < sampled < 0.35 * 390 and whys[10:].count(None) == 390 - sampled
    again = ReviewIntake(section(ReviewConfig, queue_dir=str(tmp_path / "review"), sample_rate=0.0))
    assert again.submit(pixels[0], response(0, refer=True)) == "referred"  # already queued: not counted again
    again.close()
    assert again.status()["referred"] == 0
    queued = ReviewQueue(tmp_path / "review").items()
    assert len(queued) == 10 + sampled and intake.status() | {} == {
        "ok": True, "queue_dir": str(tmp_path / "review"), "referred": 10, "sampled": sampled, "failed": 0,
        "last_error": None}

    (tmp_path / "blocked").write_text("a file where the queue's folder should be")
    failing = ReviewIntake(section(ReviewConfig, queue_dir=str(tmp_path / "blocked"), sample_rate=0.0))
    assert failing.submit(pixels[0], response(0, refer=True)) == "referred"  # the request does not fail
    failing.close()
    status = failing.status()
    assert not status["ok"] and status["failed"] == 1 and "blocked" in status["last_error"]


def read_items(tmp_path: Path, rows: list[tuple[str, str, str]], version: str = "m/1") -> ReviewQueue:
    """A queue of read items: (why queued, the model's class, the reader's label) each."""
    queue = ReviewQueue(tmp_path / "review")
    for index, ((why, predicted, label), pixels) in enumerate(zip(rows, slices(len(rows), seed=11), strict=True)):
        identifier = queue.add(pixels, answer(predicted, None if why == "sampled" else "doubt"), version, f"r{index}", why)
        queue.label(identifier, label, "dr-a")
    return queue


def test_accuracy_on_readings_weights_the_sample_and_alerts_when_tumour_recall_falls(tmp_path):
    from tumorscope.monitoring.accuracy import ALERT, INSUFFICIENT, OK, reviewed_accuracy

    # Decided answers sampled at 0.25: 16 tumours, 12 of them called Normal by the model; 8 normals right.
    # Referred answers (all kept): 4 tumours the model got right, 2 it called Cyst, 2 unreadable.
    rows = ([("sampled", "Normal", "Tumor")] * 12 + [("sampled", "Tumor", "Tumor")] * 4
            + [("sampled", "Normal", "Normal")] * 8 + [("referred", "Tumor", "Tumor")] * 4
            + [("referred", "Cyst", "Tumor")] * 2 + [("referred", "Tumor", CANNOT_ASSESS)] * 2)
    queue = read_items(tmp_path, rows)
    summary = reviewed_accuracy(queue.items("labelled"), 0.25, "Tumor", champion_recall=0.9, min_readings=10)
    assert summary["n_read"] == 30 and summary["n_cannot_assess"] == 2
    assert summary["decided"]["accuracy"] == pytest.approx(12 / 24)
    assert summary["decided"]["recall"] == {"Normal": 1.0, "Tumor": pytest.approx(4 / 16)}
    assert summary["referred"]["model_right"] == pytest.approx(4 / 6)
    # Weights 4 (sampled) and 1 (referred): tumour recall (4*4 + 4) / (16*4 + 6) = 20 / 70.
    assert summary["critical"]["recall"] == pytest.approx(20 / 70)
    assert summary["critical"]["n_effective"] == pytest.approx(70 ** 2 / (16 * 16 + 6))
    assert summary["status"] == ALERT and summary["alert"] and summary["critical"]["p_value"] < 0.05
    assert "is below the champion's test recall 0.90" in summary["reason"]

    agreeing = read_items(tmp_path / "agree", [("sampled", "Tumor", "Tumor")] * 18 + [("sampled", "Normal", "Tumor")] * 2)
    fine = reviewed_accuracy(agreeing.items("labelled"), 0.25, "Tumor", champion_recall=0.9, min_readings=10)
    assert fine["status"] == OK and not fine["alert"] and fine["critical"]["p_value"] >= 0.05

    few = reviewed_accuracy(agreeing.items("labelled"), 0.25, "Tumor", champion_recall=0.9, min_readings=50)
    assert few["status"] == INSUFFICIENT and not few["alert"] and "(< review.min_readings 50)" in few["reason"]
    other = reviewed_accuracy(agreeing.items("labelled"), 0.25, "Tumor", 0.9, model_version="m/2")
    assert other["n_read"] == 0 and other["n_other_versions"] == 20


def test_too_few_classes_for_evidentlys_report_are_said_not_hidden(tmp_path):
    from tumorscope.monitoring.accuracy import classification_report, readings_frame

    two = read_items(tmp_path, [("sampled", "Normal", "Tumor")] * 3 + [("sampled", "Normal", "Normal")] * 3)
    assert classification_report(readings_frame(two.items())) is None
    three = read_items(tmp_path / "three", [("sampled", "Normal", "Tumor"), ("sampled", "Cyst", "Cyst"),
                                            ("referred", "Normal", "Normal")] * 3)
    assert classification_report(readings_frame(three.items())) is not None
