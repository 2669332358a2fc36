"""The review loop end to end, as a hospital team runs it, on the shared tiny DVC project: the real
Bento server answers a user's slices and queues them; a reviewer reads them through the API and one
on the clinician page (headless Chromium); the monitoring flow finds enough read items, harvests
them into a labelled batch and starts the experiment deployment, which a `prefect worker` runs as
`dvc exp run` on old + new data with the champion's configuration (no new study) starting from its weights; the promotion
gates judge the result."""

from __future__ import annotations

import csv
import json
import time

import httpx
import pytest
import yaml

from helpers import bento
from helpers.browser import browser, open_review_item, sign_in
from helpers.images import phantom_pngs
from helpers.processes import stop
from helpers.projects import copy_project, git, monitoring_flow_with_a_worker, run_tool, tool_env
from helpers.requirements import needs_chromium

# Uses the session's tiny dvc repro: on its xdist worker (tests/integration/conftest.py).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("tiny-dvc")]

USER_KEY = "user-key-" + "u" * 24
REVIEWER_KEY = "reviewer-key-" + "r" * 24
PAGE_READER_KEY = "reviewer-key-" + "p" * 24


def _label_on_the_page(url: str, item: str, label: str) -> None:
    from selenium.webdriver.common.by import By

    driver = browser()
    try:
        wait = sign_in(driver, url, PAGE_READER_KEY)
        driver.find_element(By.CSS_SELECTOR, "#review summary").click()
        open_review_item(driver, wait, item)
        wait.until(lambda d: d.find_element(By.ID, "reviewoverlay").is_displayed())
        driver.find_element(By.CSS_SELECTOR, f'#reviewchoices button[data-label="{label}"]').click()
        wait.until(lambda d: f"{label} by dr-page" in d.find_element(By.ID, "reviewhistory").text)
    finally:
        driver.quit()


@needs_chromium
def test_readings_of_served_answers_become_data_a_retraining_learns_from_and_the_gates_judge(
        tiny_dvc_run, prefect_server, tmp_path):
    project = copy_project(tiny_dvc_run.project, tmp_path / "project")
    keys = project.parent / "service.keys"  # outside the project: keys never go in git
    keys.write_text(f"user {USER_KEY} ward-3\nreviewer {REVIEWER_KEY} dr-api\nreviewer {PAGE_READER_KEY} dr-page\n")
    slices = phantom_pngs(2, size=64)  # other patients than the project's phantom: 8 slices, 2 per class
    params = bento.serve_params(project)  # every path absolute: the server's workers run in the repository
    params["serve"]["auth"] |= {"keys_file": str(keys)}
    params["review"] |= {"sample_rate": 1.0, "retrain_after": len(slices)}
    # The champion's configuration, no study, fine-tuned from its weights: the retraining a site can afford.
    params["monitor"]["retrain"] |= {"deployment": "tumorscope-experiment/train", "tune": False, "warm_start": True,
                                     "wait_seconds": 900}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git(["commit", "-q", "-am", "serve with keys, queue every answer, retrain on readings"], project)
    n_before = sum(json.loads((project / "reports" / "ingest.json").read_text())["files_per_label"].values())

    # A user's slices: each answer is queued (review.sample_rate 1), nothing else is needed.
    served = bento.start(project, {}, params["promote"]["registered_model"], name="review-server")
    try:
        truth = {}
        for name, data in slices.items():
            answer = httpx.post(f"{served.url}/classify", headers={"X-API-Key": USER_KEY}, timeout=60,
                                files=[("file", (name, data, "image/png"))])
            assert answer.status_code == 200, answer.text
            truth[answer.json()["request_id"]] = name.split("-")[1]

        def post(path: str, body: dict) -> dict:
            response = httpx.post(f"{served.url}{path}", json=body, timeout=60,
                                  headers={"Authorization": f"Bearer {REVIEWER_KEY}"})
            assert response.status_code == 200, response.text
            return response.json()

        deadline, queued = time.monotonic() + 30, []
        while time.monotonic() < deadline and len(queued) < len(slices):
            queued = post("/review_queue", {"status": "pending", "limit": 100})["items"]
            time.sleep(0.2)
        assert len(queued) == len(slices), queued
        requests = {item["item"]: post("/review_item", {"item": item["item"]})["request_id"] for item in queued}
        on_the_page, *through_the_api = sorted(requests)
        for item in through_the_api:
            assert post("/review_label", {"item": item, "label": truth[requests[item]]})["label"] == truth[requests[item]]
        _label_on_the_page(served.url, on_the_page, truth[requests[on_the_page]])
        assert post("/review_queue", {"status": "pending", "limit": 100})["items"] == []
    finally:
        stop(served.process)

    # The monitoring flow: enough read items -> harvest -> the experiment deployment on a worker.
    env = tool_env(project, **prefect_server.env(), PYTHONPATH=str(project))
    _, result = monitoring_flow_with_a_worker(project, env, "review-pool", tmp_path / "worker.log")
    log = (tmp_path / "worker.log").read_text(errors="replace")[-3000:]
    assert result["review"]["waiting"] == len(slices), result["review"]
    retraining = result["retraining"]
    assert retraining["why"].startswith(f"{len(slices)} read items wait to be harvested"), retraining
    assert retraining["state"] == "COMPLETED", f"{retraining}\n{log}"
    assert retraining["parameters"] == {"reuse_champion": True, "warm_start": True, "add_data": retraining["harvested"]}

    # The readings became a labelled batch with its provenance, versioned and ingested beside the old data.
    with open(f"{retraining['harvested']}/provenance.csv") as table:
        rows = list(csv.DictReader(table))
    assert sorted((r["item"], r["label"], r["reviewer"]) for r in rows) == sorted(
        (item, truth[requests[item]], "dr-page" if item == on_the_page else "dr-api") for item in requests)
    included = sum(r["included"] == "True" for r in rows)
    assert included + sum(r["included"] != "True" for r in rows) == len(slices) and included > 0
    ingested = json.loads((project / "reports" / "ingest.json").read_text())
    assert sum(ingested["files_per_label"].values()) == n_before + included
    assert [p.name for p in (project / "data" / "added").glob("*.dvc")] == [f"{ingested_batch}.dvc" for ingested_batch
                                                                            in ingested["added_batches"]]

    # The gates judged it, and DVC recorded it as an experiment with the decision.
    decision = retraining["promotion"]
    assert decision["version"] == "tumorscope-kidney-ct/2" and decision["decision"] in ("promoted", "refused")
    shown = json.loads(run_tool(["dvc", "exp", "show", "--json"], project).stdout)
    revisions = [exp["revs"][0]["data"] for entry in shown for exp in (entry.get("experiments") or [])]
    gates = [revision["metrics"]["reports/promotion_metrics.json"]["data"] for revision in revisions]
    assert [g["challenger_version"] for g in gates] == [2] and gates[0]["promoted"] is (decision["decision"] == "promoted")
    # It started from the champion's weights, saved under a name that says which champion they are.
    start = revisions[0]["params"]["params.yaml"]["data"]["train"]["init_weights"]
    assert start == ".retrain/champion-tumorscope-kidney-ct-1/model.keras" and (project / start).is_file()
    assert revisions[0]["params"]["params.yaml"]["data"]["tune"]["n_trials"] == 0
    # The gates compared challenger and champion on the read slices that the new split put in test too.
    import pandas as pd

    split = pd.read_csv(project / "data" / "split.csv")
    read_in_test = split[(split["split"] == "test") & split["path"].str.contains("/added/reviewed-", regex=False)]
    comparison = json.loads((project / "reports" / "promotion.json").read_text())["comparison"]
    on_readings = comparison["on_readings"]  # less any the champion trained near (promotion's "unseen" rule)
    assert on_readings["n_slices"] <= len(read_in_test) and ("low" in on_readings) == (on_readings["n_slices"] > 0)
    # Every queued item was harvested, once: none is left read and waiting.
    for status, n in (("harvested", len(slices)), ("labelled", 0), ("pending", 0)):
        listed = run_tool(["tumorscope", "review", "list", "--status", status], project).stdout
        assert f"review: {n} {status} item(s)" in listed, listed
