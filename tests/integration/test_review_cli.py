"""`tumorscope review` on a project: readings recorded from the command line and from a Label Studio
export, harvested into a batch that `tumorscope ingest` takes like any added batch; user mistakes
are one line each."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tumorscope.config import load_params
from tumorscope.review.queue import ReviewQueue

pytestmark = pytest.mark.slow


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tumorscope.cli", *args], capture_output=True, text=True, timeout=300)


def test_readings_from_the_cli_and_label_studio_become_a_batch_ingest_takes(project, tmp_path):
    from tumorscope.data.images import read_greyscale

    params = load_params("params.yaml")
    queue = ReviewQueue(params.review.queue_dir)
    raw = sorted(p for p in Path(params.data.raw_dir).rglob("*") if p.is_file())
    new = np.random.default_rng(0).integers(0, 256, (3, 48, 48), dtype=np.uint8)  # slices the data lacks
    probabilities = {"Cyst": 0.1, "Normal": 0.2, "Stone": 0.1, "Tumor": 0.6}
    ids = [queue.add(p, {"class": "Tumor", "probabilities": probabilities, "refer": True,
                         "refer_reason": "prediction set holds 2 classes"}, "tumorscope-kidney-ct/1", f"r{i}", "referred")
           for i, p in enumerate([*new, read_greyscale(raw[0], params.data.dicom_window)[0]])]

    listed = cli("review", "list")
    assert listed.returncode == 0 and listed.stdout.strip().endswith("review: 4 pending item(s) in review")
    done = cli("review", "label", ids[0], "Cyst", "--reviewer", "dr-a")
    assert done.returncode == 0 and done.stdout.strip() == f"review: {ids[0]} read as Cyst by dr-a"
    again = cli("review", "label", ids[0], "Tumor", "--reviewer", "dr-b")
    assert again.stdout.strip() == f"review: {ids[0]} read as Tumor by dr-b (was Cyst)"

    exported = cli("review", "export", str(tmp_path / "tasks.json"))
    assert exported.returncode == 0, exported.stderr
    tasks = json.loads((tmp_path / "tasks.json").read_text())
    assert [t["data"]["item"] for t in tasks] == ids[1:]  # the pending ones
    assert (tmp_path / "tasks.label_config.xml").read_text().startswith("<View>")
    annotated = [task | {"annotations": [{"completed_by": {"email": "reader@hospital.example"}, "result": [
        {"from_name": "class", "to_name": "image", "type": "choices", "value": {"choices": [label]}}]}]}
        for task, label in zip(tasks, ["Stone", "Normal", "Normal"], strict=True)]
    (tmp_path / "export.json").write_text(json.dumps(annotated))
    imported = cli("review", "import", str(tmp_path / "export.json"))
    assert imported.stdout.strip() == "review: 3 reading(s) applied, 0 skipped (cancelled or empty), 0 refused"

    harvested = cli("review", "harvest", "--name", "reviewed-test")
    assert harvested.returncode == 0, harvested.stderr
    assert "harvested 3 slice(s) {'Normal': 1, 'Stone': 1, 'Tumor': 1}" in harvested.stdout
    assert "1 excluded" in harvested.stdout  # the slice that is already in the data
    batch = Path(params.data.added_dir) / "reviewed-test"
    ingested = cli("ingest")
    assert ingested.returncode == 0, ingested.stderr
    assert f"incl. 3 from 1 added batch(es) in {params.data.added_dir}" in ingested.stdout
    assert (batch / "provenance.csv").is_file()


@pytest.mark.parametrize(("args", "message"), [
    (["review", "label", "0" * 24, "Cyst", "--reviewer", "dr-a"], "error: no review item '000000000000000000000000'"),
    (["review", "import", "missing.json"], "error: Label Studio export not found: missing.json"),
    (["review", "harvest"], "error: nothing to harvest: no labelled item in review"),
    (["review", "export", "tasks.json"], "error: nothing to export: no pending item in review"),
    (["review", "list", "--status", "done"], "error: --status must be all, pending or labelled, not 'done'"),
])
def test_review_mistakes_are_one_line(project, args, message):
    done = cli(*args)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().startswith(message), done.stderr
