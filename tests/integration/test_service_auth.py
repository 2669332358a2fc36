"""API keys on the real server: a second `bentoml serve` of the session's tiny models (helpers/bento.py)
with a user key from the environment and an admin key from a keys file. Every route is called with
no key, a wrong key, a user key and an admin key; probes and pages stay open; no key reaches a log;
the clinician page asks for a key once and keeps it for the tab."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import yaml

from helpers import bento
from helpers.browser import browser, enter_key, open_review_item, sign_in
from helpers.images import phantom_pngs
from helpers.processes import stop
from helpers.requirements import needs_chromium

# Shares the session Bento server's project, on its xdist worker (tests/integration/conftest.py).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("bento")]

USER_KEY = "user-key-" + "u" * 24
ADMIN_KEY = "admin-key-" + "a" * 24
WRONG_KEY = "wrong-key-" + "w" * 24
REVIEWER_KEY = "reviewer-key-" + "r" * 24


@pytest.fixture(scope="module")
def keyed(served, tmp_path_factory):
    root = tmp_path_factory.mktemp("keyed")
    keys_file = root / "service.keys"
    keys_file.write_text(f"# outside git\nadmin {ADMIN_KEY}\nreviewer {REVIEWER_KEY} dr-okafor\n")
    params = yaml.safe_load(served.params_path.read_text())
    params["serve"] |= {"inference_log": str(root / "inference.jsonl")}
    params["serve"]["auth"] |= {"keys_file": str(keys_file)}
    params_path = root / "params.yaml"
    params_path.write_text(yaml.safe_dump(params))
    server = bento.start(served.project, served.versions, served.registered_model, params_path,
                         {"TUMORSCOPE_API_KEYS": USER_KEY}, name="keyed-server")
    yield server
    stop(server.process)


def slice_upload(field: str = "file") -> list:
    name, data = next(iter(phantom_pngs(1).items()))
    return [(field, (name, data, "image/png"))]


def call(server, method: str, path: str, key: str | None) -> httpx.Response:
    headers = {} if key is None else {"Authorization": f"Bearer {key}"}
    files = slice_upload("files" if path == "/classify_batch" else "file") if path in (
        "/classify", "/classify_batch", "/explain") else None
    json_body = {} if method == "POST" and files is None else None
    return httpx.request(method, f"{server.url}{path}", headers=headers, files=files, json=json_body, timeout=60)


ROUTES = [("POST", "/classify"), ("POST", "/classify_batch"), ("POST", "/explain"), ("POST", "/metadata"),
          ("GET", "/metadata"), ("POST", "/health"), ("GET", "/health"), ("POST", "/reload"), ("GET", "/metrics")]


@pytest.mark.parametrize(("method", "path"), ROUTES)
def test_every_route_needs_a_key_and_reload_an_admin_key(keyed, method: str, path: str):
    for key in (None, WRONG_KEY):
        refused = call(keyed, method, path, key)
        assert refused.status_code == 401, refused.text
        assert refused.json()["status"] == 401 and refused.headers["www-authenticate"].startswith("Bearer")
    user = call(keyed, method, path, USER_KEY)
    if path == "/reload":
        assert user.status_code == 403 and user.json() == {"error": "/reload needs an admin key", "status": 403}
    else:
        assert user.status_code == 200, user.text
    admin = call(keyed, method, path, ADMIN_KEY)
    assert admin.status_code == 200, admin.text
    if path == "/classify":
        assert admin.json()["class"] == user.json()["class"]


def test_a_reviewer_reads_a_referred_answer_and_the_reading_keeps_its_history(keyed):
    """Classify -> queued -> listed, shown and labelled through the API by a reviewer key (a user
    key may not), relabelled by an admin; unknown items and classes are 4xx, nothing written."""
    import base64
    import io
    import time

    import numpy as np
    from PIL import Image

    from helpers.images import png_bytes

    pixels = np.random.default_rng(77).integers(0, 256, (96, 96), dtype=np.uint8)  # a slice only this test sends
    answer = httpx.post(f"{keyed.url}/classify", headers={"X-API-Key": USER_KEY}, timeout=60,
                        files=[("file", ("noise.png", png_bytes(pixels), "image/png"))]).json()
    assert answer["refer"]

    def post(path: str, key: str, body: dict) -> httpx.Response:
        return httpx.post(f"{keyed.url}{path}", headers={"Authorization": f"Bearer {key}"}, json=body, timeout=60)

    deadline, listed = time.monotonic() + 20, []
    while time.monotonic() < deadline and not listed:
        queue = post("/review_queue", REVIEWER_KEY, {"status": "all", "limit": 10_000})
        assert queue.status_code == 200, queue.text
        listed = [i for i in queue.json()["items"] if i["refer_reason"] == answer["refer_reason"]
                  and i["model_class"] == answer["class"] and i["label"] is None]
        time.sleep(0.2)
    item = post("/review_item", REVIEWER_KEY, {"item": listed[-1]["item"]}).json()
    assert item["request_id"] == answer["request_id"] and item["why"] == "referred" and item["readings"] == []
    shown = np.asarray(Image.open(io.BytesIO(base64.b64decode(item["slice_png_base64"]))))
    np.testing.assert_array_equal(shown, pixels)
    # The reader sees where the serving model looked: Grad-CAM over the slice, in colour.
    overlay = Image.open(io.BytesIO(base64.b64decode(item["overlay_png_base64"])))
    assert overlay.mode == "RGB" and overlay.size == pixels.shape[::-1]
    assert item["explained_by"] == answer["model_version"] and item["explained_class"] == answer["class"]

    refused = post("/review_label", USER_KEY, {"item": item["item"], "label": "Cyst"})
    assert refused.status_code == 403 and refused.json()["error"] == "/review_label needs a reviewer or admin key"
    read = post("/review_label", REVIEWER_KEY, {"item": item["item"], "label": "Cyst"})
    assert read.status_code == 200, read.text
    assert read.json()["label"] == "Cyst" and read.json()["readings"][-1]["reviewer"] == "dr-okafor"
    assert read.json()["overlay_png_base64"] is None  # a reading is recorded, nothing is explained again
    assert read.json()["readings"][-1]["model_version"] == answer["model_version"]
    again = post("/review_label", ADMIN_KEY, {"item": item["item"], "label": "Tumor"}).json()
    assert [r["label"] for r in again["readings"]] == ["Cyst", "Tumor"] and again["readings"][-1]["previous"] == "Cyst"

    unknown = post("/review_label", REVIEWER_KEY, {"item": "0" * 24, "label": "Cyst"})
    assert unknown.status_code == 404 and unknown.json()["error"].startswith("no review item")
    wrong = post("/review_label", REVIEWER_KEY, {"item": item["item"], "label": "Melanoma"})
    assert wrong.status_code == 422 and "'Melanoma' is not one of the classes" in wrong.json()["error"]
    assert len(post("/review_item", REVIEWER_KEY, {"item": item["item"]}).json()["readings"]) == 2
    assert post("/review_queue", REVIEWER_KEY, {"status": "done"}).status_code == 422


def test_without_keys_the_review_routes_are_closed(served):
    for path in ("/review_queue", "/review_item", "/review_label"):
        refused = httpx.post(f"{served.url}{path}", json={}, timeout=30)
        assert refused.status_code == 403 and refused.json()["error"].startswith(f"{path} needs API keys")


def test_the_openapi_document_says_how_to_send_a_key(keyed):
    doc = httpx.get(f"{keyed.url}/docs.json", timeout=30).json()
    assert set(doc["components"]["securitySchemes"]) == {"bearer", "apiKey"}
    for path in ("/classify", "/classify_batch", "/explain", "/metadata", "/health", "/reload"):
        assert doc["paths"][path]["post"]["security"] == [{"bearer": []}, {"apiKey": []}]
        assert "401" in doc["paths"][path]["post"]["responses"]
    assert "403" in doc["paths"]["/reload"]["post"]["responses"]


def test_probes_and_pages_are_open_and_keys_stay_out_of_the_logs(keyed):
    for path in ("/livez", "/readyz", "/ui/", "/docs.json"):
        assert httpx.get(f"{keyed.url}{path}", timeout=30).status_code == 200, path
    answer = httpx.post(f"{keyed.url}/classify", headers={"X-API-Key": USER_KEY}, files=slice_upload(), timeout=60)
    assert answer.status_code == 200
    bento.logged_records(keyed.inference_log, [answer.json()["request_id"]])
    for log in (keyed.log_path, keyed.inference_log):
        text = log.read_text(errors="replace")
        for key in (USER_KEY, ADMIN_KEY, WRONG_KEY):
            assert key not in text, f"{key[:10]}... in {log.name}"


@needs_chromium
def test_the_clinician_page_asks_for_a_key_once_per_tab(keyed, tmp_path: Path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    name, data = next(iter(phantom_pngs(1).items()))
    slice_path = tmp_path / name
    slice_path.write_bytes(data)
    driver = browser()
    try:
        driver.get(f"{keyed.url}/ui/")
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: d.find_element(By.ID, "keyform").is_displayed())
        assert driver.find_element(By.ID, "keymessage").text == "This service needs an API key."
        driver.find_element(By.ID, "apikey").send_keys(WRONG_KEY)
        driver.find_element(By.CSS_SELECTOR, "#keyform button").click()
        wait.until(lambda d: "refused" in d.find_element(By.ID, "keymessage").text and
                   d.find_element(By.ID, "keyform").is_displayed())
        driver.find_element(By.ID, "apikey").send_keys(USER_KEY)
        driver.find_element(By.CSS_SELECTOR, "#keyform button").click()
        wait.until(lambda d: d.find_element(By.ID, "version").text not in ("", "-"))
        assert not driver.find_element(By.ID, "keyform").is_displayed()
        driver.find_element(By.ID, "file").send_keys(str(slice_path))
        wait.until(lambda d: d.find_element(By.ID, "result").is_displayed())
        assert driver.find_element(By.ID, "verdict").text.split(" (")[0] in ("Cyst", "Normal", "Stone", "Tumor")

        driver.refresh()  # the same tab: the key is kept, not asked again
        wait.until(lambda d: d.find_element(By.ID, "version").text not in ("", "-"))
        assert not driver.find_element(By.ID, "keyform").is_displayed()
        assert USER_KEY not in driver.page_source
    finally:
        driver.quit()


def test_without_keys_the_service_refuses_a_network_address_unless_told_anonymous(served, tmp_path):
    """Secure by default: `bentoml serve` on 0.0.0.0 (its default address, a container's) with no key
    configured stops at start-up with one line naming the setting, before it binds anything."""
    import os
    import subprocess

    from helpers.processes import free_port

    env = os.environ | {"TUMORSCOPE_PARAMS": str(served.params_path), "BENTOML_HOME": str(tmp_path / "bentoml-home"),
                        "BENTOML_DO_NOT_TRACK": "True", "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("TUMORSCOPE_API_KEYS", None)
    env.pop("TUMORSCOPE_ADMIN_KEYS", None)
    for host_args in (["--host", "0.0.0.0"], []):  # explicit, and BentoML's default address
        done = subprocess.run([*bento.bentoml_command(), "serve", bento.SERVICE, *host_args, "--port", str(free_port()),
                               "--working-dir", str(bento.REPO)], cwd=served.project, env=env, capture_output=True,
                              text=True, timeout=180)
        assert done.returncode == 2, done.stderr[-2000:]
        assert "Traceback" not in done.stderr
        assert ("tumorscope service: error: the service would answer anyone who can reach 0.0.0.0 without an API key: "
                "set $TUMORSCOPE_API_KEYS (or serve.auth.keys_file), bind --host 127.0.0.1, or set "
                "serve.auth.anonymous: true to allow it") in done.stderr


@needs_chromium
def test_a_reviewer_reads_a_queued_answer_on_the_clinician_page(keyed):
    """The page's review tab: a user key is told it may not read the queue; a reviewer key lists the
    pending answers, shows one and records a reading, which the API then returns."""
    import time

    import numpy as np
    from selenium.webdriver.common.by import By

    from helpers.images import png_bytes
    from tumorscope.review.queue import item_id

    pixels = np.random.default_rng(91).integers(0, 256, (96, 96), dtype=np.uint8)  # a slice only this test sends
    sent = httpx.post(f"{keyed.url}/classify", headers={"X-API-Key": USER_KEY}, timeout=60,
                      files=[("file", ("noise.png", png_bytes(pixels), "image/png"))]).json()
    assert sent["refer"]
    identifier, deadline = item_id(pixels), time.monotonic() + 20
    while time.monotonic() < deadline and httpx.post(f"{keyed.url}/review_item", json={"item": identifier}, timeout=30,
                                                     headers={"X-API-Key": REVIEWER_KEY}).status_code != 200:
        time.sleep(0.2)

    driver = browser()
    try:
        wait = sign_in(driver, keyed.url, USER_KEY)
        driver.find_element(By.CSS_SELECTOR, "#review summary").click()
        wait.until(lambda d: "needs a reviewer or admin key" in d.find_element(By.ID, "reviewstatus").text)
        driver.find_element(By.ID, "reviewkey").click()
        enter_key(driver, wait, REVIEWER_KEY)
        open_review_item(driver, wait, identifier)
        assert sent["class"] in driver.find_element(By.ID, "reviewanswer").text
        wait.until(lambda d: d.find_element(By.ID, "reviewoverlay").is_displayed())
        assert driver.find_element(By.ID, "reviewexplained").text == (
            f"Grad-CAM: where model {sent['model_version']} looked for {sent['class']}.")
        assert driver.find_element(By.ID, "reviewhistory").text == "No reading yet."
        driver.find_element(By.CSS_SELECTOR, '#reviewchoices button[data-label="Stone"]').click()
        wait.until(lambda d: "Stone by dr-okafor" in d.find_element(By.ID, "reviewhistory").text)
        assert driver.find_element(By.ID, "reviewoverlay").is_displayed()  # still shown after the reading
    finally:
        driver.quit()
    item = httpx.post(f"{keyed.url}/review_item", json={"item": identifier}, headers={"X-API-Key": REVIEWER_KEY},
                      timeout=30).json()
    assert [(r["label"], r["reviewer"]) for r in item["readings"]] == [("Stone", "dr-okafor")]
