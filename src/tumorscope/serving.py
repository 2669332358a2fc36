"""What the Bento service does, as plain functions and classes (``serving/service.py`` is a thin
BentoML shell around them, so that all of it is testable without a server).

Two halves, matching the service's two processes:

* the API side checks an upload (``UploadGuard`` at the ASGI level, then ``prepare_upload`` per
  file), prepares it exactly as training did (``inference.prepare_bytes``), turns the model's
  answer into a response (``classify_response``) and appends a line to the inference log
  (``InferenceLog``: a background writer that never blocks or fails a request);
* the model side (``ServedModel``) holds the loaded classifier, answers batches with
  probabilities and an embedding summary, explains one slice with Grad-CAM, and reloads when the
  registry alias moves.

Every refusal is a ``BadRequest`` with an HTTP status and a one-line message: 400 for a malformed
request, 413 for too much data, 415 for a content type that is not an image, 422 for a file that
arrived intact but is not a usable CT slice.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from tumorscope.inference import PreparedImage
from tumorscope.monitoring.features import feature_model, image_features, summarize_embedding

PARAMS_ENV = "TUMORSCOPE_PARAMS"
FILE_FIELD = "file"
BATCH_FIELD = "files"
CLASS_FIELD = "target_class"
# Part content types accepted for an image file. Browsers and curl send image/* for PNG/JPEG,
# application/dicom or application/octet-stream for .dcm; a part without one is taken as octet-stream.
ACCEPTED_CONTENT_TYPES = ("image/*", "application/dicom", "application/octet-stream")
# A CT slice is a few hundred pixels a side and roughly square; anything else is not one (a
# thumbnail, a scout strip, a screenshot of a report).
MIN_SIDE = 16
MAX_ASPECT_RATIO = 4.0
# Bytes a multipart body may carry beyond its files: boundaries and part headers.
MULTIPART_SLACK = 16 * 1024
MAX_JSON_BODY = 64 * 1024
# The random projection behind the embedding summary is fixed by this seed (and the layer width),
# so summaries from different requests, processes and days are comparable for drift monitoring.
# Longest side of the slice an explanation overlay is drawn on (the original can be 8192 px).
OVERLAY_MAX_SIDE = 512
MAX_FILENAME_BYTES = 200  # file systems allow 255 bytes a name; BentoML adds a prefix
STATE_KEY = "tumorscope_uploads"  # where UploadGuard leaves what it learnt of the file parts


# ---------------------------------------------------------------------------------------------
# Refusals


class BadRequest(Exception):
    """A request the service refuses: ``status`` is the HTTP status (4xx), the message one line."""

    def __init__(self, message: str, status: int = 400):
        self.message = one_line(message)
        self.status = status
        super().__init__(self.message)

    def body(self) -> dict[str, Any]:
        return {"error": self.message, "status": self.status}


def one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def content_type_accepted(content_type: str | None) -> bool:
    media = (content_type or "application/octet-stream").split(";")[0].strip().lower()
    return media.startswith("image/") or media in ACCEPTED_CONTENT_TYPES


def check_upload(data: bytes, content_type: str | None, max_bytes: int) -> None:
    """Refuse an empty file, one over ``max_bytes`` or one whose part says it is not an image."""
    if not content_type_accepted(content_type):
        raise BadRequest(f"unsupported content type {content_type!r}: send a PNG or JPEG image "
                         f"or a DICOM file ({', '.join(ACCEPTED_CONTENT_TYPES)})", 415)
    if not data:
        raise BadRequest("empty file: the upload has no bytes", 400)
    if len(data) > max_bytes:
        raise BadRequest(f"file too large: {len(data)} bytes (limit {max_bytes} bytes)", 413)


def suffix_for(filename: str | None, content_type: str | None) -> str:
    """The suffix ``prepare_bytes`` is given: the file name's, or .dcm for application/dicom (the
    decoder recognises DICOM by its magic bytes anyway; the suffix helps a file without them)."""
    suffix = Path(filename or "").suffix.lower()
    if not suffix and (content_type or "").split(";")[0].strip().lower() == "application/dicom":
        return ".dcm"
    return suffix


def status_for_reason(reason: str) -> int:
    """HTTP status for an ``UnreadableImage`` reason: 400 empty, 413 too large, else 422."""
    if reason.startswith("empty file"):
        return 400
    if reason.startswith(("image too large", "file too large")):
        return 413
    return 422


def _dicom_without_pixels(data: bytes) -> bool:
    """True for a DICOM file (magic bytes) that has no pixel data element at all."""
    if data[128:132] != b"DICM":
        return False
    import io

    import pydicom

    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True, defer_size=256)
    except Exception:  # unreadable header: the decoder's own reason stands
        return False
    return not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))


def check_dimensions(shape: tuple[int, int]) -> None:
    rows, cols = shape
    if min(rows, cols) < MIN_SIDE:
        raise BadRequest(f"image too small: {cols}x{rows} pixels (each side must be at least {MIN_SIDE})", 422)
    ratio = max(rows, cols) / min(rows, cols)
    if ratio > MAX_ASPECT_RATIO:
        raise BadRequest(f"implausible shape for a CT slice: {cols}x{rows} pixels (aspect ratio {ratio:.1f}, "
                         f"at most {MAX_ASPECT_RATIO:g})", 422)


def prepare_upload(data: bytes, filename: str | None, content_type: str | None, spec: dict,
                   max_bytes: int) -> PreparedImage:
    """Check an uploaded file and prepare it as the training cache did; raises ``BadRequest``."""
    from tumorscope.data.images import UnreadableImage, error_reason
    from tumorscope.inference import prepare_bytes

    check_upload(data, content_type, max_bytes)
    try:
        prepared = prepare_bytes(data, suffix_for(filename, content_type), spec)
    except UnreadableImage as err:
        if _dicom_without_pixels(data):
            raise BadRequest("DICOM file has no pixel data (a header-only or non-image DICOM object)", 422) from None
        reason = error_reason(err)
        raise BadRequest(reason, status_for_reason(reason)) from None
    check_dimensions(prepared.original_shape)
    return prepared


# ---------------------------------------------------------------------------------------------
# What a response says about the image


def source_warnings(mode: str) -> list[str]:
    """Warnings for inputs training's decoder accepts but converts (the service mirrors training,
    so it accepts them too, and says what it did)."""
    if mode in ("L", "DICOM"):
        return []
    if mode.startswith(("I", "F")):
        return [f"high bit-depth image ({mode}): stretched from its own minimum and maximum to 8 bits, as training "
                "did; intensities are relative, not Hounsfield units (send DICOM for windowed HU)"]
    if mode == "1":
        return ["1-bit (black and white) image: converted to greyscale; unlikely to be a CT slice"]
    return [f"colour image ({mode}): converted to greyscale as training did; a CT slice is normally greyscale"]


def image_statistics(prepared: PreparedImage) -> dict[str, Any]:
    """The monitoring features of the model input (``monitoring.features``: intensity percentiles,
    contrast, sharpness, noise, original size, bit depth; measured on the slice decoded and prepared
    as the training cache holds it, so drift against the cache compares like with like), its range,
    original size and mode."""
    pixels = np.asarray(prepared.pixels)
    spacing = prepared.pixel_spacing_mm
    return image_features(pixels, prepared.original_shape, prepared.source_mode) | {
        "min": float(pixels.min()), "max": float(pixels.max()),
        "original_shape": [int(prepared.original_shape[0]), int(prepared.original_shape[1])],
        "model_input_shape": [int(s) for s in prepared.pixels.shape[:2]],
        "source_mode": prepared.source_mode,
        "pixel_spacing_mm": None if spacing is None else [float(spacing[0]), float(spacing[1])]}


def classify_result(probabilities: Any, classes: list[str], critical_class: str, alert_threshold: float) -> dict[str, Any]:
    """Class, per-class probabilities and the alert flag (probability of ``critical_class`` >=
    ``alert_threshold``; never raised for a model without that class)."""
    probs = [float(p) for p in np.asarray(probabilities, dtype=np.float64).ravel()]
    if len(probs) != len(classes):
        raise ValueError(f"{len(probs)} probabilities for {len(classes)} classes")
    best = int(np.argmax(probs))
    critical = probs[classes.index(critical_class)] if critical_class in classes else None
    return {"class": classes[best], "confidence": probs[best], "probabilities": dict(zip(classes, probs, strict=True)),
            "critical_class": critical_class, "critical_probability": critical, "alert_threshold": alert_threshold,
            "alert": critical is not None and critical >= alert_threshold}


# ---------------------------------------------------------------------------------------------
# The model side


@dataclass
class _Current:
    loaded: Any  # inference.LoadedModel
    features: Any  # feature_model(loaded.model)
    loaded_at: str


def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class ServedModel:
    """The model service's state: one loaded model, swapped whole on reload (a request holds the
    model it started with, so a batch never mixes two versions), and counts of the batch sizes it
    ran (the evidence that adaptive batching batches).

    ``loader(name, ref)`` returns an ``inference.LoadedModel`` (``registry.load_model`` by default);
    ``resolver(name, ref)`` returns the registered version an alias or number names now, or None for
    a URI (``reload`` skips loading when it is the version already served)."""

    def __init__(self, name: str, ref: str, embedding_dims: int, loader=None, resolver=None):
        self.name, self.ref, self.embedding_dims = name, ref, embedding_dims
        self._loader = loader or _registry_loader
        self._resolver = resolver or _registry_resolver
        self._current: _Current | None = None
        self.load_error: str | None = None
        self._lock = threading.Lock()
        self.batch_sizes: Counter[int] = Counter()

    @property
    def ready(self) -> bool:
        return self._current is not None

    def _load(self) -> _Current:
        loaded = self._loader(self.name, self.ref)
        current = _Current(loaded, feature_model(loaded.model), utc_now())
        # One warm-up pass: the first predict traces the function (seconds on TensorFlow), which
        # would otherwise land on the first request and on the batching dispatcher's timing.
        warm = np.zeros((1, loaded.image_size, loaded.image_size, 1), dtype=np.uint8)
        current.features.predict_on_batch(warm)
        return current

    def load(self) -> bool:
        """Load the configured model; on failure keep serving none and record why (readiness and
        health say so; ``reload`` tries again)."""
        from tumorscope.errors import UserError

        try:
            current = self._load()
        except UserError as err:
            self.load_error = one_line(str(err))
            return False
        except Exception as err:  # a broken artefact, an unreachable store: recorded, the server stays up
            self.load_error = one_line(f"{type(err).__name__}: {err}")
            return False
        with self._lock:
            self._current, self.load_error = current, None
        return True

    def current(self) -> _Current:
        current = self._current
        if current is None:
            raise ModelUnavailable(f"no model loaded ({self.load_error or 'not loaded yet'})")
        return current

    def predict(self, images: np.ndarray) -> list[dict[str, Any]]:
        """Probabilities and embedding summary of each (size, size, 1) uint8 image of a batch."""
        current = self.current()
        images = np.asarray(images, dtype=np.uint8)
        expected = (current.loaded.image_size, current.loaded.image_size, 1)
        if images.ndim != 4 or images.shape[1:] != expected:
            raise ValueError(f"images of shape {images.shape[1:]} for a model that takes {expected}")
        outputs = current.features.predict_on_batch(images)
        probabilities = np.asarray(outputs[0], dtype=np.float64)
        embeddings = summarize_embedding(np.asarray(outputs[1]), self.embedding_dims)
        with self._lock:
            self.batch_sizes[len(images)] += 1
        return [{"probabilities": probabilities[i].tolist(), "embedding": embeddings[i].astype(float).tolist(),
                 "model_version": current.loaded.version, "batch_size": len(images)} for i in range(len(images))]

    def explain(self, image: np.ndarray, class_index: int | None = None) -> dict[str, Any]:
        """Grad-CAM heat map (size, size) in [0, 1] of one prepared slice, with its probabilities."""
        from tumorscope.models.explain import grad_cam

        current = self.current()
        image = np.asarray(image, dtype=np.uint8)
        probabilities = current.loaded.predict_proba(image[np.newaxis])[0]
        heat = grad_cam(current.loaded.model, image, class_index)
        return {"heat": np.asarray(heat, dtype=np.float32), "probabilities": np.asarray(probabilities).tolist(),
                "class_index": int(np.argmax(probabilities)) if class_index is None else int(class_index),
                "model_version": current.loaded.version}

    def info(self) -> dict[str, Any]:
        current = self._current
        with self._lock:
            histogram = {str(size): count for size, count in sorted(self.batch_sizes.items())}
            batches = sum(self.batch_sizes.values())
            images = sum(size * count for size, count in self.batch_sizes.items())
            largest = max(self.batch_sizes, default=0)
        batching = {"batches": batches, "images": images, "largest_batch": largest,
                    "batch_size_histogram": histogram}
        if current is None:
            return {"ready": False, "load_error": self.load_error, "registered_model": self.name, "ref": self.ref,
                    "batching": batching}
        loaded = current.loaded
        return {"ready": True, "load_error": None, "registered_model": self.name, "ref": self.ref,
                "model_version": loaded.version, "source": _jsonable(loaded.source), "classes": loaded.classes,
                "image_size": loaded.image_size, "spec": loaded.spec, "loaded_at": current.loaded_at,
                "batching": batching}

    def reload(self, force: bool = False) -> dict[str, Any]:
        """Load what ``ref`` names now (the alias may have moved); keep the served model when that is
        the same registered version (unless ``force``) or when loading fails."""
        from tumorscope.errors import UserError

        previous = self._current.loaded.version if self._current else None
        if not force and self._current is not None:
            try:
                version = self._resolver(self.name, self.ref)
            except UserError as err:
                return {"reloaded": False, "changed": False, "model_version": previous, "error": one_line(str(err))}
            if version is not None and self._current.loaded.source.get("version") == version:
                return {"reloaded": False, "changed": False, "model_version": previous, "error": None}
        if not self.load():
            return {"reloaded": False, "changed": False, "model_version": previous, "error": self.load_error}
        version_now = self.current().loaded.version
        return {"reloaded": True, "changed": version_now != previous, "previous_version": previous,
                "model_version": version_now, "error": None}


class ModelUnavailable(RuntimeError):
    """No model is loaded (the registry had none, or loading failed): the service answers 503."""


def _registry_loader(name: str, ref: str):
    from tumorscope import registry

    return registry.load_model(name, ref)


def _registry_resolver(name: str, ref: str) -> int | None:
    if ":/" in ref:
        return None
    import mlflow

    from tumorscope import registry

    return int(registry.get_version(mlflow.MlflowClient(), name, ref).version)


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


# ---------------------------------------------------------------------------------------------
# Responses and the inference log


def classify_response(model_answer: dict[str, Any], prepared: PreparedImage, classes: list[str], critical_class: str,
                      alert_threshold: float, request_id: str) -> dict[str, Any]:
    """The JSON answer for one classified image."""
    return {"request_id": request_id, "model_version": model_answer["model_version"],
            **classify_result(model_answer["probabilities"], classes, critical_class, alert_threshold),
            "image": image_statistics(prepared), "embedding": [float(v) for v in model_answer["embedding"]],
            "warnings": source_warnings(prepared.source_mode), "batch_size": int(model_answer["batch_size"])}


def inference_record(endpoint: str, response: dict[str, Any], data: bytes) -> dict[str, Any]:
    """One inference-log line: what monitoring needs, without the file name (it may name a patient)
    and without pixels; the SHA-256 of the bytes links repeated uploads of one file."""
    import hashlib

    return {"timestamp": utc_now(), "endpoint": endpoint, "request_id": response["request_id"],
            "model_version": response["model_version"], "predicted_class": response["class"],
            "probabilities": response["probabilities"], "alert": response["alert"],
            "image": response["image"], "embedding": response["embedding"],
            "sha256": hashlib.sha256(data).hexdigest()}


class InferenceLog:
    """JSON lines appended to ``path`` by one background thread.

    ``submit`` never blocks and never raises: a full queue drops the record and counts it, a write
    that fails (unwritable folder, full disk: any OSError) counts its records and keeps the last
    error. ``status()`` is what the health endpoint reports. The file is opened per write batch, so a
    rotated or deleted log is recreated."""

    def __init__(self, path: str | Path, max_queue: int = 10_000, autostart: bool = True):
        self.path = Path(path)
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
                lines.append(json.dumps(record, allow_nan=False, default=str) + "\n")
            except (TypeError, ValueError) as err:  # NaN, a circular value: lose the record, keep the rest
                bad += 1
                self._failed(1, err)
        if not lines:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as file:
                file.write("".join(lines))
        except Exception as err:  # OSError above all (ENOSPC, EACCES, ENOTDIR); the thread must never die
            self._failed(len(lines), err)
            return
        with self._lock:
            self.written += len(lines)

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
            return {"path": str(self.path), "ok": self.failed == 0 and self.dropped == 0, "written": self.written,
                    "dropped_queue_full": self.dropped, "failed": self.failed, "queued": self._queue.qsize(),
                    "last_error": self.last_error, "last_error_at": self.last_error_at}


# ---------------------------------------------------------------------------------------------
# Request-level checks (ASGI middleware)


@dataclass(frozen=True)
class Route:
    """What an API route accepts: the multipart file field (None: a JSON or empty body), whether it
    takes several files, and the text fields it also takes."""

    file_field: str | None = None
    many: bool = False
    text_fields: tuple[str, ...] = ()


@dataclass
class UploadPart:
    filename: str | None
    content_type: str | None
    size: int


@dataclass
class _Rejection(Exception):
    status: int
    message: str
    close: bool = False  # the body was not read to its end: the connection cannot be reused
    headers: dict[str, str] = field(default_factory=dict)


class UploadGuard:
    """ASGI middleware in front of the API routes: refuses what BentoML would otherwise turn into a
    500 or read whole first, before any of it reaches BentoML.

    * a body over the limit: by its Content-Length before a byte is read, else while it streams;
    * a content type the route cannot take (a file route takes multipart/form-data only; the others
      JSON or nothing: BentoML would parse a form there);
    * a malformed multipart body, a missing file field, a text value in a file field (BentoML would
      fetch it as a URL), a file in a text field, an unknown field, too many files.

    The body is read once here and replayed to BentoML; what was learnt of the file parts (names,
    content types) is left in ``scope["state"][STATE_KEY]`` for the API, since BentoML keeps only
    the bytes. Other paths and methods pass through (BentoML answers 404 and 405)."""

    def __init__(self, app: Any, routes: dict[str, Route], max_upload_bytes: int, max_files: int):
        self.app, self.routes = app, routes
        self.max_upload_bytes, self.max_files = max_upload_bytes, max_files

    def body_limit(self, route: Route) -> int:
        if route.file_field is None:
            return MAX_JSON_BODY
        return self.max_upload_bytes + MULTIPART_SLACK + (1024 * self.max_files if route.many else 1024)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        route = self.routes.get(scope.get("path", "")) if scope.get("type") == "http" else None
        if route is None or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        from starlette.datastructures import Headers

        headers = Headers(scope=scope)
        try:
            body = await self._read_body(headers, receive, self.body_limit(route))
            if body is None:  # the client went away
                return
            parts = await self._check_form(route, headers, body)
        except _Rejection as rejection:
            await self._reject(scope, receive, send, rejection)
            return
        except Exception as err:
            # A bug here must still answer: an exception that escapes a middleware below BentoML's
            # TimeoutMiddleware holds the request open, unanswered, for the whole traffic timeout.
            import logging

            logging.getLogger(__name__).exception("upload check failed")
            await self._reject(scope, receive, send, _Rejection(500, f"upload check failed: {type(err).__name__}", True))
            return
        if parts is not None:
            scope.setdefault("state", {})[STATE_KEY] = parts
        sent = False

        async def replay() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: only a disconnect can come

        await self.app(scope, replay, send)

    async def _read_body(self, headers: Any, receive: Any, limit: int) -> bytes | None:
        declared = headers.get("content-length")
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                raise _Rejection(400, f"invalid Content-Length header {declared!r}") from None
            if length > limit:
                raise _Rejection(413, _too_large(length, limit), close=True)
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > limit:
                raise _Rejection(413, _too_large(total, limit, streamed=True), close=True)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _check_form(self, route: Route, headers: Any, body: bytes) -> dict[str, Any] | None:
        media = headers.get("content-type", "").split(";")[0].strip().lower()
        if route.file_field is None:
            if media not in ("", "application/json"):
                raise _Rejection(415, f"unsupported content type {media!r}: this endpoint takes a JSON body or none")
            _check_json_object(body)
            return None
        example = f"curl -F {route.file_field}=@slice.png"
        if not body:
            raise _Rejection(400, f"empty request body: send the image as multipart/form-data in field "
                                  f"'{route.file_field}' (e.g. {example})")
        if media != "multipart/form-data":
            raise _Rejection(415, f"unsupported content type {media or 'none'!r}: send multipart/form-data with the "
                                  f"image in field '{route.file_field}' (e.g. {example})")
        form = await _parse_multipart(headers, body)
        try:
            allowed = (route.file_field, *route.text_fields)
            parts: list[UploadPart] = []
            for name, value in form.multi_items():
                if name not in allowed:
                    raise _Rejection(400, f"unexpected field {name!r} (this endpoint takes: {', '.join(allowed)})")
                is_file = not isinstance(value, str)
                if name == route.file_field and not is_file:
                    raise _Rejection(400, f"field '{name}' must be a file upload, not a text value (URLs are not fetched)")
                if name != route.file_field and is_file:
                    raise _Rejection(400, f"field '{name}' must be a text value, not a file")
                if not is_file:
                    _check_text_field(name, value)
                if is_file:
                    _check_filename(value.filename)
                    parts.append(UploadPart(value.filename, value.headers.get("content-type"), int(value.size or 0)))
            if not parts:
                raise _Rejection(400, f"missing field '{route.file_field}': send the image as multipart/form-data "
                                      f"(e.g. {example})")
            if not route.many and len(parts) > 1:
                raise _Rejection(400, f"{len(parts)} files in field '{route.file_field}': this endpoint takes one "
                                      "(classify_batch takes several)")
            if route.many and len(parts) > self.max_files:
                raise _Rejection(413, f"too many files: {len(parts)} (limit {self.max_files} per request)")
        finally:
            await form.close()
        return {"field": route.file_field, "parts": parts}

    @staticmethod
    async def _reject(scope: dict, receive: Any, send: Any, rejection: _Rejection) -> None:
        from starlette.responses import JSONResponse

        headers = dict(rejection.headers)
        if rejection.close:
            headers["connection"] = "close"
        response = JSONResponse({"error": one_line(rejection.message), "status": rejection.status},
                                status_code=rejection.status, headers=headers)
        await response(scope, receive, send)


def _check_json_object(body: bytes) -> None:
    """An optional JSON body must be one object (BentoML would answer a pydantic error dump)."""
    if not body.strip():
        return
    try:
        value = json.loads(body)
    except Exception as err:  # ValueError, UnicodeDecodeError, RecursionError on deep nesting
        raise _Rejection(400, f"invalid JSON body: {type(err).__name__}: {err}") from None
    if not isinstance(value, dict):
        raise _Rejection(400, f"the JSON body must be an object, got {type(value).__name__}")


def _check_text_field(name: str, value: str) -> None:
    """BentoML reads a text field as JSON when it parses (123 -> a number) and answers a pydantic
    error dump when that is not the declared string; say it in one line instead."""
    try:
        decoded = json.loads(value)
    except ValueError:
        return
    if decoded is not None and not isinstance(decoded, str):
        raise _Rejection(400, f"field '{name}' must be text, got {type(decoded).__name__} {value[:40]!r} "
                              f"(send a name that looks like JSON as a JSON string, e.g. '\"{value[:20]}\"')")


def _check_filename(filename: str | None) -> None:
    """BentoML names its temporary copy of an upload after the client's file name: a name too long
    for the file system, or one with a NUL or control character, would fail there as a 500."""
    if not filename:
        return
    if any(ord(c) < 32 or ord(c) == 127 for c in filename):
        raise _Rejection(400, "file name contains control characters")
    try:
        size = len(os.path.basename(filename).encode("utf-8"))
    except UnicodeEncodeError:
        raise _Rejection(400, "file name is not valid UTF-8") from None
    if size > MAX_FILENAME_BYTES:
        raise _Rejection(400, f"file name too long: {size} bytes (limit {MAX_FILENAME_BYTES})")


def _too_large(size: int, limit: int, streamed: bool = False) -> str:
    what = "more than" if streamed else ""
    return f"request body too large: {what} {size} bytes (limit {limit} bytes)".replace("  ", " ")


async def _parse_multipart(headers: Any, body: bytes) -> Any:
    """Parse a buffered multipart body with Starlette's parser and BentoML's (Starlette's default)
    limits, so that whatever passes here also parses there."""
    from starlette.formparsers import MultiPartException, MultiPartParser

    async def stream():
        yield body
        yield b""

    try:
        return await MultiPartParser(headers, stream()).parse()
    except MultiPartException as err:
        raise _Rejection(400, f"malformed multipart body: {err.message}") from None
    except Exception as err:  # the parser raises a few other types on broken input
        raise _Rejection(400, f"malformed multipart body: {type(err).__name__}: {err}") from None


def uploads_of(state: Any) -> list[UploadPart]:
    """The file parts ``UploadGuard`` saw, from a request's state (empty outside HTTP)."""
    found = getattr(state, STATE_KEY, None) if state is not None else None
    return list(found["parts"]) if found else []


# ---------------------------------------------------------------------------------------------
# Configuration


def params_path() -> Path:
    """$TUMORSCOPE_PARAMS, else params.yaml in the working directory."""
    return Path(os.environ.get(PARAMS_ENV) or "params.yaml")


def load_service_params():
    from tumorscope.config import load_params

    return load_params(params_path())


def configure_tracking(cfg) -> None:
    """Point MLflow at the configured store without creating anything (serving only reads)."""
    import mlflow

    from tumorscope.tracking import absolute_sqlite_uri, check_database_reachable

    check_database_reachable(cfg.tracking_uri, "mlflow.tracking_uri")
    mlflow.set_tracking_uri(absolute_sqlite_uri(cfg.tracking_uri))


def overlay_slice(decoded: np.ndarray) -> np.ndarray:
    """The decoded slice an explanation is drawn on (at most OVERLAY_MAX_SIDE a side): the original
    picture a reader recognises, not the small model input (``PreparedImage.decoded``, not decoded again)."""
    from PIL import Image

    pixels = decoded
    rows, cols = pixels.shape
    scale = OVERLAY_MAX_SIDE / max(rows, cols)
    if scale < 1:
        size = (max(1, round(cols * scale)), max(1, round(rows * scale)))
        pixels = np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.BOX))
    return pixels
