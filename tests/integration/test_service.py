"""The Bento service, served for real (``bentoml serve``, see bento_server.py), on real and phantom
slices: its answers equal the registered model's own predictions, batching is adaptive, bad input
gets a 4xx with one line, and a reload follows the champion alias."""

from __future__ import annotations

import asyncio
import base64
import io
import json

import httpx
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from helpers import bento as bento_server
from helpers.bento import Served, logged_records
from helpers.images import not_ct_images, phantom_dicom, phantom_pngs, png_bytes
from helpers.paths import FIXTURE_SLICES, SAMPLE
from helpers.requirements import needs_sample

# One session Bento server, on one xdist worker (tests/integration/conftest.py).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("bento")]


@pytest.fixture(scope="session")
def client(served):
    with httpx.Client(base_url=served.url, timeout=60) as session:
        yield session


@pytest.fixture(scope="session")
def models(served):
    """The registered versions, loaded in this process as the service loads them."""
    from tumorscope import registry
    from tumorscope.api.settings import configure_tracking
    from tumorscope.config import load_params

    configure_tracking(load_params(served.params_path).mlflow)
    return {v: registry.load_model(served.registered_model, str(v)) for v in served.versions}


@pytest.fixture(scope="session")
def openapi_doc(client) -> dict:
    """The OpenAPI document the service serves."""
    response = client.get("/docs.json")
    assert response.status_code == 200, response.text
    return response.json()


def assert_documented(doc: dict, method: str, path: str, response: httpx.Response) -> None:
    """The answer is valid against the schema the served OpenAPI document gives for its status."""
    import jsonschema

    responses = doc["paths"][path][method]["responses"]
    assert str(response.status_code) in responses, f"{method} {path}: {response.status_code} is not documented"
    schema = responses[str(response.status_code)]["content"]["application/json"]["schema"]
    jsonschema.Draft202012Validator({**schema, "components": doc["components"]}).validate(response.json())


def fixture_files() -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(FIXTURE_SLICES.glob("*/*.jpg"))}


def classify(client: httpx.Client, name: str, data: bytes, content_type: str = "image/jpeg") -> httpx.Response:
    return client.post("/classify", files={"file": (name, data, content_type)})


def prepared_batch(loaded, files: dict[str, bytes]) -> np.ndarray:
    from pathlib import Path

    from tumorscope.inference import prepare_bytes, stack

    return stack([prepare_bytes(data, Path(name).suffix, loaded.spec) for name, data in files.items()], loaded.image_size)


def expected_probabilities(loaded, files: dict[str, bytes]) -> np.ndarray:
    """The network's own probabilities (the answers' raw_probabilities)."""
    return loaded.predict_proba(prepared_batch(loaded, files))


def probabilities(answer: dict, classes: list[str]) -> list[float]:
    return [answer["raw_probabilities"][c] for c in classes]


# ---------------------------------------------------------------------------------------------
# Answers


def test_classify_equals_the_registered_model_on_real_and_phantom_slices(client, models):
    loaded = models[1]
    files = fixture_files() | phantom_pngs()
    answers = []
    for name, data in files.items():
        response = classify(client, name, data, "image/png" if name.endswith(".png") else "image/jpeg")
        assert response.status_code == 200, response.text
        answers.append(response.json())
    np.testing.assert_allclose([probabilities(a, loaded.classes) for a in answers], expected_probabilities(loaded, files),
                               rtol=1e-5, atol=1e-6)
    # The shown probabilities, the sets and the referrals are LoadedModel.answers' (as tumorscope predict's).
    _, judged = loaded.answers(prepared_batch(loaded, files))
    np.testing.assert_allclose([[a["probabilities"][c] for c in loaded.classes] for a in answers], judged.probabilities,
                               rtol=1e-5, atol=1e-6)
    assert [a["refer"] for a in answers] == judged.refer.tolist()
    assert [a["refer_reason"] for a in answers] == judged.reasons
    assert [a["prediction_set"] for a in answers] == [[c for c, inside in zip(loaded.classes, row, strict=True) if inside]
                                                      for row in judged.sets]
    first = answers[0]
    assert first["calibrated"] and first["model_version"] == f"{loaded.version}" and first["class"] in loaded.classes
    assert sum(first["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert first["alert"] == (first["probabilities"]["Tumor"] >= first["alert_threshold"])
    assert len(first["embedding"]) == 8 and first["image"]["model_input_shape"] == [32, 32]
    assert first["image"]["source_mode"] == "L" and first["warnings"] == [] and first["request_id"]


def test_classify_equals_predict_on_the_cached_test_split(served, client, models):
    """The cache holds exactly what prepare_file gives: the service's answer for a test-split file
    equals model.predict on that file's cached slice."""
    loaded = models[1]
    table = pd.read_csv(served.project / "data" / "split.csv")
    test_rows = table[table["split"] == "test"]
    cached = np.load(served.project / "data" / "cache" / "test_x.npy")
    assert len(test_rows) == len(cached) > 0
    answers = []
    for path in test_rows["path"]:
        response = classify(client, path.rsplit("/", 1)[-1], (served.project / path).read_bytes())
        assert response.status_code == 200, response.text
        answers.append(probabilities(response.json(), loaded.classes))
    np.testing.assert_allclose(answers, loaded.model.predict(cached, verbose=0), rtol=1e-5, atol=1e-6)


def test_classify_batch_equals_classify_per_item_and_reports_bad_files_per_item(client):
    files = list(fixture_files().items())[:5]
    upload = [("files", (name, data, "image/jpeg")) for name, data in files]
    upload.insert(2, ("files", ("broken.jpg", files[0][1][:1500], "image/jpeg")))
    upload.append(("files", ("notes.txt", b"not an image", "text/plain")))
    response = client.post("/classify_batch", files=upload)
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["n_files"], body["n_ok"], body["n_failed"]) == (7, 5, 2)
    results = body["results"]
    assert [r["index"] for r in results] == list(range(7)) and results[2]["filename"] == "broken.jpg"
    assert not results[2]["ok"] and results[2]["status"] == 422 and "corrupt" in results[2]["error"]
    assert not results[6]["ok"] and results[6]["status"] == 415
    for item in (r for r in results if r["ok"]):
        single = classify(client, item["filename"], dict(files)[item["filename"]]).json()
        assert item["class"] == single["class"]
        np.testing.assert_allclose(list(item["probabilities"].values()), list(single["probabilities"].values()),
                                   rtol=1e-5, atol=1e-6)


def test_explain_returns_an_overlay_png_and_the_region(client, models):
    name, data = next(iter(fixture_files().items()))
    response = client.post("/explain", files={"file": (name, data, "image/jpeg")})
    assert response.status_code == 200, response.text
    body = response.json()
    overlay = Image.open(io.BytesIO(base64.b64decode(body["overlay_png_base64"])))
    assert overlay.format == "PNG" and overlay.mode == "RGB"
    assert [overlay.height, overlay.width] == body["overlay_shape"] == body["image"]["original_shape"]
    assert body["heatmap_shape"] == [32, 32] and body["explained_class"] == body["class"]
    region = body["region"]
    assert {"bbox", "area_px", "area_mm2", "centroid", "side", "patient_side", "quadrant", "bbox_original"} <= set(region)
    assert region["area_mm2"] is None  # a JPEG has no pixel spacing: no guessed millimetres
    expected = expected_probabilities(models[1], {name: data})[0]
    np.testing.assert_allclose(probabilities(body, models[1].classes), expected, rtol=1e-5, atol=1e-6)
    # The same answer as classify: calibrated probabilities, the set, the referral.
    single = classify(client, name, data).json()
    assert (body["prediction_set"], body["refer"], body["refer_reason"]) == \
        (single["prediction_set"], single["refer"], single["refer_reason"])
    assert body["probabilities"] == pytest.approx(single["probabilities"], abs=1e-6)
    other = client.post("/explain", files={"file": (name, data, "image/jpeg")}, data={"target_class": "Stone"})
    assert other.status_code == 200 and other.json()["explained_class"] == "Stone"


def test_dicom_is_classified_and_explained_in_millimetres(client):
    dicom = phantom_dicom("Tumor", spacing=(0.8, 0.8))
    response = client.post("/classify", files={"file": ("slice.dcm", dicom, "application/dicom")})
    assert response.status_code == 200, response.text
    assert response.json()["image"]["source_mode"] == "DICOM" and response.json()["image"]["pixel_spacing_mm"] == [0.8, 0.8]
    explained = client.post("/explain", files={"file": ("slice.dcm", dicom, "application/octet-stream")}).json()
    region = explained["region"]
    if region["bbox"] is not None:  # a model with no positive evidence anywhere has no region
        # 96 px slice shown to a 32 px model: a heat pixel is 3 x 3 original pixels of 0.8 mm.
        assert region["area_mm2"] == pytest.approx(region["area_px"] * 9 * 0.64)


def test_rgb_and_16_bit_pngs_are_accepted_with_a_warning(client):
    rng = np.random.default_rng(3)
    rgb = classify(client, "colour.png", png_bytes(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)), "image/png")
    deep = classify(client, "deep.png", png_bytes(rng.integers(0, 65535, (64, 64), dtype=np.uint16)), "image/png")
    assert rgb.status_code == deep.status_code == 200
    assert rgb.json()["image"]["source_mode"] == "RGB" and "colour image" in rgb.json()["warnings"][0]
    assert "high bit-depth" in deep.json()["warnings"][0]


@needs_sample
def test_real_sample_slices_equal_the_registered_model(client, models):
    files = {p.name: p.read_bytes() for label in ("Cyst", "Normal", "Stone", "Tumor")
             for p in sorted((SAMPLE / label).glob("*.jpg"))[:3]}
    answers = [classify(client, name, data) for name, data in files.items()]
    assert all(r.status_code == 200 for r in answers)
    np.testing.assert_allclose([probabilities(r.json(), models[1].classes) for r in answers],
                               expected_probabilities(models[1], files), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Metadata, health, inference log, batching


def test_images_no_radiologist_would_send_are_referred_with_a_reason(client):
    """Blank, constant, noise, a colour gradient and text: each answered (200) but referred, with the
    reason, through classify, classify_batch and explain."""
    files = {name: png_bytes(pixels.astype(np.uint8)) for name, pixels in not_ct_images().items()}
    answers = {}
    for name, data in files.items():
        response = classify(client, name, data, "image/png")
        assert response.status_code == 200, response.text
        answers[name] = response.json()
    reasons = {name: answer["refer_reason"] for name, answer in answers.items()}
    assert all(answer["refer"] for answer in answers.values()), reasons
    for name in ("white.png", "black.png", "grey.png"):
        assert reasons[name].startswith("blank or constant image") and answers[name]["ood"], reasons
    assert answers["noise.png"]["ood"], reasons  # unlike training slices, not merely uncertain
    batch = client.post("/classify_batch", files=[("files", (n, d, "image/png")) for n, d in files.items()]).json()
    assert [r["refer_reason"] for r in batch["results"]] == list(reasons.values())
    explained = client.post("/explain", files={"file": ("white.png", files["white.png"], "image/png")}).json()
    assert explained["refer"] and explained["refer_reason"] == reasons["white.png"]


def test_referred_answers_are_queued_for_review_with_their_slice_and_answer(served, client):
    """The session's server queues every referred answer (and review.sample_rate of the others) in
    review.queue_dir, off the request path; /health counts them."""
    import time

    from tumorscope.review.queue import ReviewQueue, item_id

    pixels = np.random.default_rng(2026).integers(0, 256, (96, 96), dtype=np.uint8)  # noise no other test sends
    response = classify(client, "noise.png", png_bytes(pixels), "image/png").json()
    assert response["refer"]
    queue = ReviewQueue(served.project / "review")
    identifier = item_id(pixels)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not (queue.items_dir / f"{identifier}.json").is_file():
        time.sleep(0.2)
    item = queue.item(identifier)
    assert item.record["why"] == "referred" and item.record["request_id"] == response["request_id"]
    assert item.record["answer"]["refer_reason"] == response["refer_reason"]
    assert item.record["answer"]["class"] == response["class"] and item.status == "pending"
    np.testing.assert_array_equal(queue.pixels(identifier), pixels)
    review = client.post("/health").json()["review_queue"]
    assert review["ok"] and review["referred"] >= 1 and review["failed"] == 0


def test_metadata_and_health(served, client, models):
    meta = client.post("/metadata").json()
    assert meta["model_version"] == models[1].version and meta["classes"] == models[1].classes
    assert meta["input_size"] == 32 and meta["alert_threshold"] == 0.5 and meta["critical_class"] == "Tumor"
    assert meta["max_upload_bytes"] == bento_server.MAX_UPLOAD_BYTES and meta["max_batch_files"] == 8
    assert meta["adaptive_batching"]["max_batch_size"] == 16
    assert meta["trust"]["coverage_target"] == pytest.approx(0.9) and meta["trust"]["temperature"] > 0
    health = client.post("/health").json()
    assert health["status"] == "ok" and health["model_version"] == models[1].version
    assert health["inference_log"]["ok"] and health["inference_log"]["failed"] == 0
    assert health["review_queue"]["ok"] and health["review_queue"]["queue_dir"] == str(served.project / "review")
    assert client.get("/readyz").status_code == 200 and client.get("/healthz").status_code == 200
    # GET too, as load balancers and Kubernetes probes send it: the same answers as POST.
    got = client.get("/health")
    assert got.status_code == 200 and got.json()["status"] == "ok"
    got_meta = client.get("/metadata", headers={"content-type": "text/plain"})  # a stray header changes nothing
    assert got_meta.status_code == 200 and got_meta.json()["classes"] == meta["classes"]
    assert client.get("/classify").status_code == 405  # only the read-only routes take GET


def test_every_classification_is_in_the_inference_log(served, client):
    name, data = next(iter(fixture_files().items()))
    request_ids = [classify(client, name, data).json()["request_id"] for _ in range(3)]
    record = logged_records(served.inference_log, request_ids)[request_ids[-1]]
    assert {"timestamp", "model_version", "request_id", "image", "embedding", "probabilities", "predicted_class",
            "sha256", "prediction_set", "refer", "refer_reason", "ood", "ood_distance", "orientation"} <= set(record)
    assert isinstance(record["refer"], bool) and record["ood_distance"] >= 0
    assert record["orientation"] in {"axial", "coronal", "other"}
    assert name not in json.dumps(record)  # file names are never logged
    assert client.post("/health").json()["inference_log"]["written"] >= 3
    # The clinician page only explains: its slices are logged too, with the same fields.
    explained = client.post("/explain", files={"file": (name, data, "image/jpeg")}).json()["request_id"]
    logged = logged_records(served.inference_log, [explained])
    assert logged[explained]["endpoint"] == "explain" and set(record) == set(logged[explained])
    assert logged[explained]["sha256"] == record["sha256"]  # one file: monitoring counts it once


def test_concurrent_single_requests_share_batches(served, client):
    """Adaptive batching: single-image requests sent together come back saying they ran in one
    batch with others, and the model service's batch-size histogram (and BentoML's metric) agree."""
    files = list(fixture_files().items())
    for name, data in files[:12]:  # the dispatcher runs its first batches one request at a time to time them
        assert classify(client, name, data).status_code == 200

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=served.url, timeout=60) as session:
            return await asyncio.gather(*(session.post("/classify", files={"file": (n, d, "image/jpeg")})
                                          for n, d in files))

    sizes = []
    for _ in range(3):
        responses = asyncio.run(burst())
        assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
        sizes += [r.json()["batch_size"] for r in responses]
    assert max(sizes) > 1, f"no request shared a batch: {sizes}"
    batching = client.post("/metadata").json()["adaptive_batching"]
    assert batching["largest_batch"] > 1 and any(int(k) > 1 for k in batching["batch_size_histogram"])
    metrics = client.get("/metrics").text
    assert 'bentoml_service_adaptive_batch_size_count{method_name="predict"' in metrics


# ---------------------------------------------------------------------------------------------
# Bad input: 4xx with one line, and the server keeps serving


def multipart(boundary: str, parts: list[bytes]) -> bytes:
    return b"".join(b"--" + boundary.encode() + b"\r\n" + p + b"\r\n" for p in parts) + b"--" + boundary.encode() + b"--\r\n"


def bad_requests() -> list[tuple[str, dict, int, str]]:
    jpeg = next(iter(fixture_files().values()))
    too_big = b"\xff\xd8" + bytes(bento_server.MAX_UPLOAD_BYTES + 20_000)
    return [
        ("not an image", {"files": {"file": ("a.png", b"hello, not an image at all", "image/png")}}, 422, "not an image"),
        ("truncated JPEG", {"files": {"file": ("a.jpg", jpeg[:3000], "image/jpeg")}}, 422, "corrupt"),
        ("empty file", {"files": {"file": ("a.png", b"", "image/png")}}, 400, "empty file"),
        ("empty body", {"content": b"", "headers": {"content-type": "multipart/form-data; boundary=x"}}, 400, "empty"),
        ("wrong part type", {"files": {"file": ("a.jpg", jpeg, "text/html")}}, 415, "content type"),
        ("wrong request type", {"content": jpeg, "headers": {"content-type": "image/jpeg"}}, 415, "multipart/form-data"),
        ("JSON instead of a file", {"json": {"file": "aGVsbG8="}}, 415, "multipart/form-data"),
        ("over the size limit", {"files": {"file": ("a.jpg", too_big, "image/jpeg")}}, 413, "too large"),
        ("too small", {"files": {"file": ("a.png", png_bytes(np.zeros((8, 64), np.uint8)), "image/png")}}, 422, "too small"),
        ("absurd aspect", {"files": {"file": ("a.png", png_bytes(np.zeros((20, 200), np.uint8)), "image/png")}}, 422,
         "aspect ratio"),
        ("DICOM without pixel data", {"files": {"file": ("a.dcm", phantom_dicom(pixels=False), "application/dicom")}}, 422,
         "no pixel data"),
        ("missing field", {"files": {"image": ("a.jpg", jpeg, "image/jpeg")}}, 400, "unexpected field"),
        ("text instead of file", {"data": {"file": "http://127.0.0.1/x.png"}, "files": {"dummy": ("", b"")}}, 400,
         "must be a file"),
        ("malformed multipart", {"content": multipart("x", [b"Content-Disposition: form-data\r\n\r\n1"]),
                                 "headers": {"content-type": "multipart/form-data; boundary=x"}}, 400, "malformed multipart"),
        ("no boundary", {"content": b"abc", "headers": {"content-type": "multipart/form-data"}}, 400, "malformed multipart"),
    ]


@pytest.mark.parametrize("case", bad_requests(), ids=lambda case: case[0])
def test_bad_input_gets_a_4xx_with_one_line(client, openapi_doc, case):
    _, request, status, words = case
    response = client.post("/classify", **request)
    assert response.status_code == status, response.text
    assert_documented(openapi_doc, "post", "/classify", response)
    error = response.json()["error"]
    assert words in error and "\n" not in error and len(error) <= 300


def raw_http(served: Served, request: bytes, timeout: float = 10) -> bytes:
    """Send bytes an HTTP client library would refuse to send; return what came back."""
    import socket
    from urllib.parse import urlsplit

    where = urlsplit(served.url)
    with socket.create_connection((where.hostname, where.port), timeout=timeout) as sock:
        sock.sendall(request)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received


def test_a_declared_size_over_the_limit_is_refused_before_the_body_is_read(served):
    answer = raw_http(served, b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=x\r\n"
                              b"Content-Length: 10000000000\r\n\r\n--x\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413") and b"connection: close" in head.lower()
    assert b"request body too large" in body


def test_wrong_method_path_and_json_bodies(client):
    assert client.get("/classify").status_code == 405
    assert client.put("/explain").status_code == 405
    assert client.post("/no-such-endpoint").status_code == 404
    assert client.post("/metadata", content=b"{not json", headers={"content-type": "application/json"}).status_code == 400
    assert client.post("/classify_batch", files=[("files", (f"{i}.png", b"1", "image/png")) for i in range(9)]).status_code == 413
    assert client.post("/explain", files={"file": ("a.jpg", b"1", "image/jpeg")},
                       data={"target_class": "Banana"}).status_code == 422
    name, data = next(iter(fixture_files().items()))
    assert classify(client, name, data).status_code == 200  # still serving


# ---------------------------------------------------------------------------------------------
# Reload follows the champion alias (last: it moves the alias, and puts it back)


def test_reload_follows_the_champion(served, client, models):
    from tumorscope import registry
    from tumorscope.api.settings import configure_tracking
    from tumorscope.config import load_params

    configure_tracking(load_params(served.params_path).mlflow)  # the served project's registry

    name, data = next(iter(fixture_files().items()))
    assert client.post("/reload").json() == {"reloaded": False, "changed": False, "model_version": models[1].version,
                                             "previous_version": None, "error": None}
    registry.make_champion(served.registered_model, "2", "serving test: promotion")
    try:
        assert client.post("/metadata").json()["model_version"] == models[1].version  # until told to reload
        outcome = client.post("/reload").json()
        assert outcome["reloaded"] and outcome["changed"] and outcome["model_version"] == models[2].version
        assert client.post("/metadata").json()["model_version"] == models[2].version
        answer = classify(client, name, data).json()
        assert answer["model_version"] == models[2].version
        np.testing.assert_allclose(probabilities(answer, models[2].classes),
                                   expected_probabilities(models[2], {name: data})[0], rtol=1e-5, atol=1e-6)
    finally:
        registry.make_champion(served.registered_model, "1", "serving test: roll back")
        back = client.post("/reload").json()
    assert back["model_version"] == models[1].version and back["changed"]


# ---------------------------------------------------------------------------------------------
# The contract: the OpenAPI document describes every answer


def test_every_answer_is_valid_against_the_served_openapi_document(client, openapi_doc):
    from tumorscope.api import contract

    doc = openapi_doc
    name, data = next(iter(fixture_files().items()))
    upload = {"file": (name, data, "image/jpeg")}
    batch = [("files", (name, data, "image/jpeg")), ("files", ("bad.png", b"not an image", "image/png"))]
    calls = [("post", "/classify", {"files": upload}), ("post", "/classify_batch", {"files": batch}),
             ("post", "/explain", {"files": upload}), ("post", "/explain", {"files": upload, "data": {"target_class": "x"}}),
             ("post", "/metadata", {"json": {}}), ("get", "/metadata", {}), ("post", "/health", {}), ("get", "/health", {}),
             ("post", "/reload", {"json": {}}), ("post", "/metadata", {"content": b"[]", "headers": {
                 "content-type": "application/json"}})]
    statuses = set()
    for method, path, request in calls:
        response = client.request(method.upper(), path, **request)
        assert_documented(doc, method, path, response)
        statuses.add(response.status_code)
    assert statuses == {200, 400, 422}  # both answers and refusals were checked

    # Each field of an answer is in the document, described where it needs words.
    schemas = doc["components"]["schemas"]
    classification = schemas[doc["paths"]["/classify"]["post"]["responses"]["200"]["content"]["application/json"]
                             ["schema"]["$ref"].rsplit("/", 1)[-1]]
    fields = {f.alias or n for n, f in contract.Classification.model_fields.items()}
    assert set(classification["properties"]) == fields and set(classification["required"]) == fields
    undescribed = [k for k, v in classification["properties"].items() if "description" not in v and k != "image"]
    assert not undescribed
    nullable = classification["properties"]["critical_probability"]
    assert {"type": "null"} in nullable["anyOf"]  # not flattened to its first branch
    assert "ErrorBody" in schemas and "securitySchemes" not in doc["components"]  # no keys on this server
