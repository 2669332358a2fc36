"""tumorscope.serving without a server: upload checks, the response pieces, the inference log, the
ASGI upload guard (driven by httpx against a minimal ASGI app) and the model side on a tiny model."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest

from helpers.images import dicom_bytes, png_bytes
from helpers.params import section
from helpers.paths import FIXTURE_SLICES
from tumorscope.api import refusals, responses, served_model, upload_guard
from tumorscope.api.inference_log import InferenceLog
from tumorscope.api.refusals import BadRequest
from tumorscope.api.upload_guard import Route, UploadGuard
from tumorscope.config import PreprocessConfig, WindowConfig
from tumorscope.inference import PreparedImage, input_spec
from tumorscope.monitoring import features as monitoring_features

CLASSES = ["Cyst", "Normal", "Stone", "Tumor"]
SPEC = input_spec(CLASSES, section(PreprocessConfig, image_size=32), section(WindowConfig))
LIMIT = 64 * 1024


def fixture_jpeg() -> bytes:
    return next(FIXTURE_SLICES.glob("Tumor/*.jpg")).read_bytes()


# ---------------------------------------------------------------------------------------------
# Upload checks and preparation


@pytest.mark.parametrize(("data", "content_type", "status", "words"), [
    (b"", "image/png", 400, "empty file"),
    (b"x" * (LIMIT + 1), "image/png", 413, "too large"),
    (b"abc", "text/plain", 415, "unsupported content type"),
    (b"abc", "application/json", 415, "unsupported content type"),
])
def test_check_upload_refuses_with_status(data, content_type, status, words):
    with pytest.raises(BadRequest, match=words) as caught:
        refusals.check_upload(data, content_type, LIMIT)
    assert caught.value.status == status and "\n" not in caught.value.message


@pytest.mark.parametrize("content_type", ["image/png", "image/jpeg", "IMAGE/PNG; q=1", "application/dicom",
                                          "application/octet-stream", None])
def test_check_upload_accepts_image_types(content_type):
    refusals.check_upload(b"abc", content_type, LIMIT)


def test_suffix_and_status_mapping():
    assert refusals.suffix_for("Slice.PNG", "image/png") == ".png"
    assert refusals.suffix_for("scan", "application/dicom") == ".dcm"
    assert refusals.suffix_for(None, None) == ""
    assert refusals.status_for_reason("empty file") == 400
    assert refusals.status_for_reason("image too large: 9x9 pixels") == 413
    assert refusals.status_for_reason("corrupt image (OSError: truncated)") == 422


def test_prepare_upload_real_slice_matches_training_preparation():
    from tumorscope.inference import prepare_bytes

    data = fixture_jpeg()
    prepared = refusals.prepare_upload(data, "slice.jpg", "image/jpeg", SPEC, LIMIT * 16)
    assert prepared.pixels.shape == (32, 32, 1) and prepared.pixels.dtype == np.uint8
    np.testing.assert_array_equal(prepared.pixels, prepare_bytes(data, ".jpg", SPEC).pixels)
    assert responses.source_warnings(prepared.source_mode) == []


@pytest.mark.parametrize(("make", "status", "words"), [
    (lambda: fixture_jpeg()[:2000], 422, "corrupt image"),
    (lambda: b"\x89PNG not really" + bytes(200), 422, "not an image"),
    (lambda: np.random.default_rng(0).bytes(500), 422, "not an image"),
    (lambda: png_bytes(np.zeros((10, 200), np.uint8)), 422, "too small"),
    (lambda: png_bytes(np.zeros((40, 400), np.uint8)), 422, "aspect ratio"),
    (lambda: dicom_bytes(None), 422, "no pixel data"),
])
def test_prepare_upload_refusals(make, status, words):
    with pytest.raises(BadRequest, match=words) as caught:
        refusals.prepare_upload(make(), "file.bin", "application/octet-stream", SPEC, LIMIT * 16)
    assert caught.value.status == status


def test_rgb_and_16_bit_images_are_prepared_like_training_with_a_warning():
    rng = np.random.default_rng(1)
    rgb = refusals.prepare_upload(png_bytes(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)), "c.png", "image/png",
                                 SPEC, LIMIT)
    deep = refusals.prepare_upload(png_bytes(rng.integers(0, 65535, (48, 48), dtype=np.uint16)), "d.png", "image/png",
                                  SPEC, LIMIT)
    assert rgb.source_mode == "RGB" and "colour image" in responses.source_warnings("RGB")[0]
    assert deep.source_mode.startswith("I") and "high bit-depth" in responses.source_warnings(deep.source_mode)[0]


def test_dicom_is_windowed_and_reports_its_spacing():
    hu = np.full((40, 40), -1000.0)
    hu[10:30, 10:30] = 40.0  # soft tissue at the window level: mid grey
    prepared = refusals.prepare_upload(dicom_bytes(hu, (0.5, 0.75)), "ct.dcm", "application/dicom", SPEC, LIMIT)
    stats = responses.image_statistics(prepared)
    assert prepared.source_mode == "DICOM" and stats["pixel_spacing_mm"] == [0.5, 0.75]
    assert stats["original_shape"] == [40, 40] and stats["max"] == 128.0 and stats["min"] == 0.0


# ---------------------------------------------------------------------------------------------
# Response pieces


def test_image_statistics_of_the_model_input():
    pixels = np.arange(1024, dtype=np.uint16).reshape(32, 32, 1) % 256
    stats = responses.image_statistics(PreparedImage(pixels.astype(np.uint8), "L", (512, 512)))
    assert stats["mean"] == pytest.approx(127.5) and stats["p50"] == pytest.approx(127.5)
    assert stats["original_shape"] == [512, 512] and stats["model_input_shape"] == [32, 32]
    assert stats["pixel_spacing_mm"] is None and stats["source_mode"] == "L"


def test_classify_result_alert_at_the_threshold():
    result = responses.classify_result([0.1, 0.2, 0.2, 0.5], CLASSES, "Tumor", 0.5)
    assert result["class"] == "Tumor" and result["alert"] is True and result["critical_probability"] == 0.5
    assert responses.classify_result([0.1, 0.2, 0.21, 0.49], CLASSES, "Tumor", 0.5)["alert"] is False
    # A model without the critical class never raises the alert.
    other = responses.classify_result([0.3, 0.7], ["Cyst", "Normal"], "Tumor", 0.0)
    assert other["alert"] is False and other["critical_probability"] is None
    with pytest.raises(ValueError):
        responses.classify_result([0.5, 0.5], CLASSES, "Tumor", 0.5)


def test_embedding_projection_is_fixed_and_keeps_distances_roughly():
    a = monitoring_features.embedding_projection(64, 8)
    np.testing.assert_array_equal(a, monitoring_features.embedding_projection(64, 8))
    assert a.shape == (64, 8) and not np.array_equal(a, monitoring_features.embedding_projection(32, 8)[:32].repeat(2, 0))
    rng = np.random.default_rng(0)
    features = rng.normal(size=(200, 64)).astype(np.float32)
    summary = monitoring_features.summarize_embedding(features, 16)
    assert summary.shape == (200, 16)
    ratio = np.linalg.norm(summary[:100] - summary[100:], axis=1) / np.linalg.norm(features[:100] - features[100:], axis=1)
    assert 0.5 < float(np.median(ratio)) < 1.5


# ---------------------------------------------------------------------------------------------
# Inference log


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_batch_answered_in_full_records_every_answer_in_order():
    recorded: list[int] = []

    async def answer(value: int, delay: float) -> int:
        await asyncio.sleep(delay)
        return value

    answers = asyncio.run(responses.answered_in_full((answer(i, 0.01 * (3 - i)) for i in range(3)), recorded.append))
    assert answers == recorded == [0, 1, 2]


def test_a_batch_refused_midway_records_nothing_even_for_answers_that_finish_later():
    """One file shed (503) refuses the whole request: the answers that were computed, before and
    after the failure, are never returned, so none may reach the inference log or review queue."""
    recorded: list[str] = []
    finished: list[str] = []

    async def answer(name: str, delay: float) -> str:
        await asyncio.sleep(delay)
        if name == "shed":
            raise served_model.ModelOverloaded("model service busy")
        finished.append(name)
        return name

    calls = (answer("early", 0.0), answer("shed", 0.01), answer("late", 0.05))
    with pytest.raises(served_model.ModelOverloaded):
        asyncio.run(responses.answered_in_full(calls, recorded.append))
    assert finished == ["early", "late"]  # every call ran to its end before the refusal ...
    assert recorded == []                 # ... and none of them was recorded


def test_inference_log_appends_json_lines(tmp_path):
    log = InferenceLog(tmp_path / "logs" / "inference.jsonl")
    for i in range(5):
        assert log.submit({"request_id": str(i), "probabilities": {"Tumor": 0.5}})
    assert log.flush()
    assert [r["request_id"] for r in read_lines(log.path)] == ["0", "1", "2", "3", "4"]
    status = log.status()
    assert status["ok"] and status["written"] == 5 and status["failed"] == 0 and status["last_error"] is None
    log.close()


def test_inference_log_to_an_unwritable_directory_does_not_raise_and_is_reported(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the log folder should be")
    log = InferenceLog(blocker / "logs" / "inference.jsonl")
    assert log.submit({"request_id": "a"}) is True  # submitting never fails
    assert log.flush()
    status = log.status()
    assert not status["ok"] and status["failed"] == 1 and status["written"] == 0
    assert "Error" in status["last_error"] and status["last_error_at"]
    # The writer thread survived: once the folder can be made, records are written again.
    blocker.unlink()
    log.submit({"request_id": "b"})
    assert log.flush() and log.status()["written"] == 1
    log.close()


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux) to simulate a full disk")
def test_inference_log_on_a_full_disk_counts_the_failure():
    log = InferenceLog("/dev/full")
    log.submit({"request_id": "a"})
    assert log.flush()
    assert log.status()["failed"] == 1 and "No space left" in log.status()["last_error"]
    log.close()


def test_inference_log_queue_full_drops_are_counted_not_silent(tmp_path):
    log = InferenceLog(tmp_path / "inference.jsonl", max_queue=2, autostart=False)
    accepted = [log.submit({"request_id": str(i)}) for i in range(5)]
    assert accepted == [True, True, False, False, False]
    status = log.status()
    assert status["dropped_queue_full"] == 3 and not status["ok"] and "queue full" in status["last_error"]
    log.start()
    assert log.flush()
    assert [r["request_id"] for r in read_lines(log.path)] == ["0", "1"]
    log.close()


def test_inference_log_loses_only_a_record_that_is_not_json(tmp_path):
    log = InferenceLog(tmp_path / "inference.jsonl")
    log.submit({"request_id": "nan", "value": float("nan")})
    log.submit({"request_id": "ok"})
    assert log.flush()
    assert [r["request_id"] for r in read_lines(log.path)] == ["ok"]
    assert log.status()["failed"] == 1
    log.close()


# ---------------------------------------------------------------------------------------------
# UploadGuard, in front of a minimal ASGI app that echoes what reached it


async def echo_app(scope, receive, send):
    body, more = b"", True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    parts = [p.__dict__ for p in scope.get("state", {}).get(upload_guard.STATE_KEY, {}).get("parts", [])]
    payload = json.dumps({"received": len(body), "parts": parts}).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": payload})


ROUTES = {"/classify": Route("file"), "/classify_batch": Route("files", many=True),
          "/explain": Route("file", text_fields=("target_class",)), "/metadata": Route()}


def guarded(method: str, path: str, **kwargs):
    import httpx

    async def go():
        app = UploadGuard(echo_app, ROUTES, max_upload_bytes=LIMIT, max_files=3)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(go())


def test_guard_passes_a_valid_upload_with_what_it_learnt():
    response = guarded("POST", "/classify", files={"file": ("a.png", b"\x89PNG....", "image/png")})
    assert response.status_code == 200
    assert response.json()["parts"] == [{"filename": "a.png", "content_type": "image/png", "size": 8}]
    assert response.json()["received"] > 8  # the whole multipart body was replayed


@pytest.mark.parametrize(("path", "kwargs", "status", "words"), [
    ("/classify", {"content": b"x" * 10, "headers": {"content-type": "multipart/form-data; boundary=b",
                                                     "content-length": str(10**12)}}, 413, "too large"),
    ("/classify", {"files": {"file": ("a.png", b"x" * (LIMIT + 20_000), "image/png")}}, 413, "too large"),
    ("/classify", {"content": b"", "headers": {"content-type": "multipart/form-data; boundary=b"}}, 400, "empty request"),
    ("/classify", {"content": b"\x89PNG", "headers": {"content-type": "image/png"}}, 415, "multipart/form-data"),
    ("/classify", {"json": {"file": "x"}}, 415, "multipart/form-data"),
    ("/classify", {"content": b"--b\r\nNoColonHeader\r\n\r\nabc\r\n--b--\r\n",
                   "headers": {"content-type": "multipart/form-data; boundary=b"}}, 400, "malformed multipart"),
    ("/classify", {"content": b"--b\r\ngarbage", "headers": {"content-type": "multipart/form-data; boundary=b"}},
     400, "missing field"),  # an unterminated part is no part
    ("/classify", {"content": b"abc", "headers": {"content-type": "multipart/form-data"}}, 400, "malformed multipart"),
    ("/classify", {"data": {"file": "https://example.com/a.png"}, "files": {"x": ("", b"")}}, 400, "must be a file"),
    ("/classify", {"files": {"other": ("a.png", b"123", "image/png")}}, 400, "unexpected field"),
    ("/classify", {"files": [("file", ("a.png", b"1", "image/png")), ("file", ("b.png", b"2", "image/png"))]},
     400, "takes one"),
    ("/classify", {"files": {"file": ("a" * 300 + ".png", b"1", "image/png")}}, 400, "file name too long"),
    ("/classify", {"content": b'--b\r\nContent-Disposition: form-data; name="file"; filename="a\x00.png"\r\n\r\n1\r\n--b--\r\n',
                   "headers": {"content-type": "multipart/form-data; boundary=b"}}, 400, "control characters"),
    ("/classify_batch", {"files": [("files", (f"{i}.png", b"1", "image/png")) for i in range(4)]}, 413, "too many files"),
    ("/explain", {"files": {"file": ("a.png", b"1", "image/png"), "target_class": ("t.bin", b"\xff", "x/y")}},
     400, "must be a text value"),
    ("/explain", {"files": {"file": ("a.png", b"1", "image/png")}, "data": {"target_class": "123"}}, 400, "must be text"),
    ("/metadata", {"files": {"file": ("a.png", b"1", "image/png")}}, 415, "JSON body"),
    ("/metadata", {"content": b"[" * 60_000, "headers": {"content-type": "application/json"}}, 400, "invalid JSON"),
    ("/metadata", {"content": b"[1, 2]", "headers": {"content-type": "application/json"}}, 400, "must be an object"),
])
def test_guard_refusals(path, kwargs, status, words):
    response = guarded("POST", path, **kwargs)
    assert response.status_code == status, response.text
    assert words in response.json()["error"] and response.json()["status"] == status


def test_guard_leaves_other_methods_and_paths_alone():
    assert guarded("GET", "/classify").status_code == 200  # the app behind answers (BentoML: 405)
    assert guarded("POST", "/elsewhere", content=b"anything").status_code == 200
    assert guarded("POST", "/metadata").status_code == 200
    assert guarded("POST", "/explain", files={"file": ("a.png", b"1", "image/png")},
                   data={"target_class": "Tumor"}).status_code == 200


# ---------------------------------------------------------------------------------------------
# The model side, on a tiny untrained CNN


@pytest.fixture(scope="module")
def tiny_loaded():
    import keras

    from tumorscope.inference import LoadedModel
    from tumorscope.models.zoo import build_small_cnn

    keras.utils.set_random_seed(0)
    model = build_small_cnn(32, len(CLASSES), filters=4, dense_units=12, norm="none")
    return LoadedModel(model, SPEC, "tiny/1", {"version": 1})


def test_served_model_predicts_like_the_loaded_model_with_an_embedding(tiny_loaded):
    served = served_model.ServedModel("tiny", "champion", 5, loader=lambda name, ref: tiny_loaded,
                                 resolver=lambda name, ref: 1)
    assert served.load() and served.ready
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 1), dtype=np.uint8)
    answers = served.predict(images)
    np.testing.assert_allclose([a["probabilities"] for a in answers], tiny_loaded.predict_proba(images),
                               rtol=1e-5, atol=1e-6)
    assert all(len(a["embedding"]) == 5 and a["batch_size"] == 3 and a["model_version"] == "tiny/1" for a in answers)
    # The embedding is the projection of the penultimate Dense layer's output.
    import keras

    dense = keras.Model(tiny_loaded.model.inputs, tiny_loaded.model.layers[-1].input).predict_on_batch(images)
    np.testing.assert_allclose([a["embedding"] for a in answers], monitoring_features.summarize_embedding(dense, 5), rtol=1e-4,
                               atol=1e-5)
    assert served.info()["batching"]["batch_size_histogram"] == {"3": 1}
    with pytest.raises(ValueError, match="shape"):
        served.predict(np.zeros((1, 16, 16, 1), np.uint8))
    explained = served.explain(images[0])
    assert explained["heat"].shape == (32, 32) and 0 <= explained["heat"].min() <= explained["heat"].max() <= 1


def test_served_model_reload_and_load_failures(tiny_loaded):
    from tumorscope.errors import UserError

    state = {"version": 1, "fail": False}

    def loader(name, ref):
        if state["fail"]:
            raise UserError("registered model 'tiny' has no alias 'champion'")
        return type(tiny_loaded)(tiny_loaded.model, SPEC, f"tiny/{state['version']}", {"version": state["version"]})

    served = served_model.ServedModel("tiny", "champion", 4, loader=loader, resolver=lambda name, ref: state["version"])
    assert served.load()
    assert served.reload() == {"reloaded": False, "changed": False, "model_version": "tiny/1", "error": None}
    state["version"] = 2
    outcome = served.reload()
    assert outcome["reloaded"] and outcome["changed"] and outcome["model_version"] == "tiny/2"
    state["fail"], state["version"] = True, 3
    failed = served.reload()
    assert not failed["reloaded"] and "no alias" in failed["error"] and served.info()["model_version"] == "tiny/2"

    empty = served_model.ServedModel("tiny", "champion", 4, loader=loader)
    assert not empty.load() and not empty.ready and "no alias" in empty.info()["load_error"]
    with pytest.raises(served_model.ModelUnavailable, match="no model loaded"):
        empty.predict(np.zeros((1, 32, 32, 1), np.uint8))


@pytest.fixture(scope="module")
def trusted_loaded(tiny_loaded):
    """The tiny model with a trust state fitted on phantom slices (its answers are poor: the point
    is that the service applies the state as ``LoadedModel.answers`` does)."""
    from tumorscope.config import ConformalConfig, OodConfig
    from tumorscope.data.phantom import image_rng, render_slice
    from tumorscope.trust.answers import fit_trust

    labels = np.arange(160) % len(CLASSES)
    images = np.stack([render_slice(image_rng(5, CLASSES[k], i), CLASSES[k], 32, 12.0, 0.7, section(WindowConfig))[0]
                       for i, k in enumerate(labels)])[..., np.newaxis].astype(np.uint8)
    trust = fit_trust(tiny_loaded.model, (images[:80], labels[:80]), (images[80:], labels[80:], np.arange(80) // 2),
                      len(CLASSES), section(ConformalConfig), section(OodConfig))
    return type(tiny_loaded)(tiny_loaded.model, SPEC, "tiny/1", {"version": 1}, trust), images[80:84]


def test_a_slice_of_an_orientation_the_model_barely_saw_is_referred_and_every_answer_names_its_orientation(
        tiny_loaded):
    """Trained on axial phantom slices: an axial slice keeps its other reasons, a coronal-shaped
    one (the same slice turned, taller than wide) is referred for its orientation."""
    from tumorscope.config import ConformalConfig, OodConfig
    from tumorscope.data import audit
    from tumorscope.data.phantom import image_rng, render_slice
    from tumorscope.trust.answers import fit_trust, judge

    labels = np.arange(160) % len(CLASSES)
    images = np.stack([render_slice(image_rng(5, CLASSES[k], i), CLASSES[k], 32, 12.0, 0.7, section(WindowConfig))[0]
                       for i, k in enumerate(labels)])[..., np.newaxis].astype(np.uint8)
    trust = fit_trust(tiny_loaded.model, (images[:80], labels[:80]), (images[80:], labels[80:], np.arange(80) // 2),
                      len(CLASSES), section(ConformalConfig), section(OodConfig), train_groups=np.arange(80) // 4, min_series=10)
    series = trust["orientation"]["series"]
    # 32-px phantom bodies are 0.6-1.0 as tall as wide: most axial, a few too round to tell ("other").
    assert trust["orientation"]["min_series"] == 10 and series["coronal"] == 0 and series["axial"] >= 15
    axial = [i for i in range(80, 160) if audit.orientation_of(audit.body_aspect(images[i])) == "axial"][:2]
    # The same grey levels and texture, turned a quarter: a body taller than wide.
    batch = np.concatenate([images[axial], np.rot90(images[axial[0]])[None]])
    probabilities, embeddings = tiny_loaded.model.predict_on_batch(batch), np.zeros((3, section(OodConfig).embedding_dims))
    judged = judge(np.asarray(probabilities), embeddings, batch, CLASSES, trust)
    assert judged.orientations == ["axial", "axial", "coronal"]
    assert judged.reasons[2] == "coronal slice: the model learnt from only 0 coronal series (< audit.min_series 10)"
    assert not any("axial slice" in (reason or "") for reason in judged.reasons)
    assert judged.answer(2, CLASSES)["orientation"] == "coronal"


def test_checks_fitted_on_export_randomised_copies_accept_another_exports_look(tiny_loaded):
    """ood.export_augment: the same anatomy as another export writes it (every transform of the
    randomisation on) is referred as unlike the training slices less often than by checks fitted
    on the slices as they are, while the slices as they are still pass."""
    from tumorscope.config import ConformalConfig, OodConfig
    from tumorscope.data.augment import randomise_export
    from tumorscope.data.phantom import image_rng, render_slice
    from tumorscope.monitoring.features import model_outputs
    from tumorscope.trust.answers import fit_trust, judge

    labels = np.arange(240) % len(CLASSES)
    images = np.stack([render_slice(image_rng(7, CLASSES[k], i), CLASSES[k], 32, 12.0, 0.7, section(WindowConfig))[0]
                       for i, k in enumerate(labels)])[..., np.newaxis].astype(np.uint8)
    train, val, new = slice(0, 120), slice(120, 180), slice(180, 240)
    other_export = randomise_export(images[new], 1.0, np.random.default_rng(3))
    unlike = {}
    for strength in (0.0, 0.5):
        trust = fit_trust(tiny_loaded.model, (images[train], labels[train]),
                          (images[val], labels[val], np.arange(60) // 2), len(CLASSES), section(ConformalConfig),
                          section(OodConfig, export_augment=strength), seed=1)
        assert trust["ood"]["export_augment"] == strength
        for name, batch in (("same", images[new]), ("other", other_export)):
            probabilities, embeddings = model_outputs(tiny_loaded.model, batch, trust["ood"]["embedding_dims"])
            unlike[strength, name] = judge(probabilities, embeddings, batch, CLASSES, trust).ood.mean()
    assert unlike[0.0, "other"] > 0.5 and unlike[0.5, "other"] < unlike[0.0, "other"] - 0.2, unlike
    assert unlike[0.5, "same"] <= 0.2, unlike


def test_served_answers_carry_the_trust_fields_of_loaded_model_answers(trusted_loaded):
    loaded, images = trusted_loaded
    blank = np.full((1, 32, 32, 1), 255, np.uint8)
    batch = np.concatenate([images, blank])
    served = served_model.ServedModel("tiny", "champion", 5, loader=lambda name, ref: loaded)
    assert served.load()
    answers = served.predict(batch)
    raw, judged = loaded.answers(batch)
    np.testing.assert_allclose([a["probabilities"] for a in answers], raw, rtol=1e-5, atol=1e-6)
    for i, answer in enumerate(answers):
        trust = answer["trust"]
        np.testing.assert_allclose(list(trust["calibrated_probabilities"].values()), judged.probabilities[i], rtol=1e-5)
        assert trust["refer"] == bool(judged.refer[i]) and trust["refer_reason"] == judged.reasons[i]
        assert trust["prediction_set"] == [c for c, inside in zip(CLASSES, judged.sets[i], strict=True) if inside]
    assert answers[-1]["trust"]["refer"] and answers[-1]["trust"]["ood"]
    assert "blank or constant" in answers[-1]["trust"]["refer_reason"]

    # The JSON answer shows the calibrated probabilities, the network's own beside them, and the alert on the former.
    result = responses.trusted_result(answers[-1], CLASSES, "Tumor", 0.5)
    assert result["calibrated"] and result["refer"] and result["prediction_set"] == answers[-1]["trust"]["prediction_set"]
    from tumorscope.api import contract

    prepared = PreparedImage(blank[0], "L", (32, 32))
    built = responses.classify_response(answers[-1], prepared, CLASSES, "Tumor", 0.5, "r2")
    assert contract.Classification.model_validate(built).model_dump() == built
    assert result["probabilities"] == answers[-1]["trust"]["calibrated_probabilities"]
    assert result["alert"] == (result["probabilities"]["Tumor"] >= 0.5)
    assert list(result["raw_probabilities"].values()) == pytest.approx(answers[-1]["probabilities"])
    # The explanation answers the same, from the same forward pass.
    explained = served.explain(blank[0])
    assert explained["heat"].shape == (32, 32)
    assert explained["trust"]["refer_reason"] == answers[-1]["trust"]["refer_reason"]
    assert explained["trust"]["ood_distance"] == pytest.approx(answers[-1]["trust"]["ood_distance"], rel=1e-5)
    assert served.info()["trust"]["coverage_target"] == pytest.approx(0.9)


def test_an_answer_without_a_trust_state_says_so(tiny_loaded):
    served = served_model.ServedModel("tiny", "champion", 5, loader=lambda name, ref: tiny_loaded)
    assert served.load()
    answer = served.predict(np.zeros((1, 32, 32, 1), np.uint8))[0]
    assert answer["trust"] is None and served.info()["trust"] is None
    result = responses.trusted_result(answer, CLASSES, "Tumor", 0.5)
    assert result["refer"] is None and not result["calibrated"] and result["probabilities"] == result["raw_probabilities"]
    prepared = PreparedImage(np.zeros((32, 32, 1), np.uint8), "L", (32, 32))
    assert responses.answer_warnings(prepared, answer) == [responses.NO_TRUST_WARNING]
    # The whole answer, as the service sends it, fits its contract (the OpenAPI document).
    from tumorscope.api import contract

    built = responses.classify_response(answer, prepared, CLASSES, "Tumor", 0.5, "r1")
    assert contract.Classification.model_validate(built).model_dump() == built
