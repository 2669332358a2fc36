"""The tumorscope Bento service: classify kidney CT slices, explain them with Grad-CAM.

Two BentoML services, two processes: ``TumorScope`` (the HTTP API: upload checks, decoding, the
inference log) depends on ``TumorModel`` (the Keras model). Single-image requests reach the model
through ``TumorModel.predict``, a batchable API, so concurrent requests are run as shared batches
(BentoML adaptive batching: serve.max_batch_size, serve.max_latency_ms). The logic lives in
``tumorscope.api``; this file only wires it to BentoML.

Configuration: the params file named by $TUMORSCOPE_PARAMS (default ./params.yaml): serve.*,
promote.registered_model, evaluate.critical_class and mlflow.*; API keys as serve.auth says.
Run: ``bentoml serve serving.service:TumorScope``.
"""

from __future__ import annotations

import asyncio
import base64
import uuid
from http import HTTPStatus
from pathlib import Path
from typing import Any, cast

import bentoml
import numpy as np
from bentoml.exceptions import BentoMLException, ServiceUnavailable

from tumorscope.api import (
    auth,
    contract,
    inference_log,
    openapi,
    probes,
    refusals,
    responses,
    review_intake,
    served_model,
    settings,
    upload_guard,
)
from tumorscope.api.refusals import BadRequest
from tumorscope.api.served_model import ModelOverloaded, ModelUnavailable
from tumorscope.api.upload_guard import Route
from tumorscope.runtime import apply_cpu_defaults

apply_cpu_defaults()  # before the model service imports TensorFlow

PARAMS, KEYS, REPLICA = settings.load_service_settings()
SERVE = PARAMS.serve
TIMEOUT_S = 120
READY_PROBE_TIMEOUT_S = 3


# BentoML's client to a dependency closes and replaces its HTTP session every runner_connection.max_requests
# calls (default 100) or max_age seconds (300), and the close fails the calls still in flight on it
# ("Cannot write to closing transport": 10 of 32 concurrent requests were lost here around the 100th
# call; the session refresh has broken before, bentoml/BentoML#5540 and #5544). The dependency is on
# a local socket, so the session is never refreshed.
NO_SESSION_REFRESH = {"max_requests": 1_000_000_000, "max_age": 10 * 365 * 24 * 3600.0}


# `tumorscope bento` builds with --arg model_tag=<BentoML model>: the Bento then carries its model
# and serves it without a registry. Without it (`bentoml serve` in the project), the registry.
CARRIED_MODEL: str | None = getattr(bentoml.use_arguments(), "model_tag", None)


def _carried_model(name: str, tag: str):
    from tumorscope.api.packaging import load_from_store

    return load_from_store(tag)


@bentoml.service(name="tumorscope_model", workers=1, traffic={"timeout": TIMEOUT_S}, runner_connection=NO_SESSION_REFRESH)
class TumorModel:
    """The classifier: from the MLflow registry (serve.model: an alias, a version or a URI), or the
    model a built Bento carries."""

    if CARRIED_MODEL:
        carried = bentoml.models.BentoModel(CARRIED_MODEL)  # packed into the Bento by bentoml build

    def __init__(self) -> None:
        if CARRIED_MODEL:
            self.served = served_model.ServedModel(PARAMS.promote.registered_model, CARRIED_MODEL, SERVE.embedding_dims,
                                              loader=_carried_model, resolver=lambda name, ref: None)
        else:
            settings.configure_tracking(PARAMS.mlflow)
            self.served = served_model.ServedModel(PARAMS.promote.registered_model, SERVE.model, SERVE.embedding_dims)
        self.served.load()  # a failure is kept (readiness fails, health says why) and reload retries

    def __is_ready__(self) -> bool:
        return self.served.ready

    @bentoml.api(batchable=True, max_batch_size=SERVE.max_batch_size, max_latency_ms=SERVE.max_latency_ms)
    def predict(self, images: np.ndarray) -> list[dict[str, Any]]:
        """(N, size, size, 1) uint8 prepared slices -> per image: probabilities, embedding summary,
        model version and the size of the batch it ran in."""
        try:
            return self.served.predict(images)
        except ModelUnavailable as err:
            raise ServiceUnavailable(str(err)) from None

    @bentoml.api
    def explain(self, image: np.ndarray, class_index: int | None = None) -> dict[str, Any]:
        try:
            return self.served.explain(image, class_index)
        except ModelUnavailable as err:
            raise ServiceUnavailable(str(err)) from None

    @bentoml.api
    def info(self) -> dict[str, Any]:
        return self.served.info()

    @bentoml.api
    def reload(self, force: bool = False) -> dict[str, Any]:
        return self.served.reload(force)


READ_ONLY = ("/health", "/metadata")
# What each route can refuse with (documented in the OpenAPI document as ErrorBody answers).
UPLOAD_ERRORS = (400, 413, 415, 422, 503)
ERRORS = {"/classify": UPLOAD_ERRORS, "/explain": UPLOAD_ERRORS, "/classify_batch": UPLOAD_ERRORS,
          "/metadata": (400, 415, 503), "/health": (400, 415), "/reload": (400, 403, 415, 503),
          "/review_queue": (400, 403, 415, 422), "/review_item": (400, 403, 404, 415, 422),
          "/review_label": (400, 403, 404, 415, 422)}
ROUTES = {"/classify": Route(upload_guard.FILE_FIELD), "/explain": Route(upload_guard.FILE_FIELD, text_fields=(upload_guard.CLASS_FIELD,)),
          "/classify_batch": Route(upload_guard.BATCH_FIELD, many=True), "/metadata": Route(), "/health": Route(),
          "/reload": Route(), "/review_queue": Route(), "/review_item": Route(), "/review_label": Route()}


# BentoML's own readiness probe of the dependency (runner_probe) is off, replaced by __is_ready__:
# while the model worker is still starting (importing TensorFlow, loading the model), the probe's
# 5 s timeout raises out of /readyz inside BentoML's TimeoutMiddleware, which then holds the probe
# request open for the whole traffic timeout and keeps the worker from shutting down until it ends.
@bentoml.service(name="tumorscope", workers=1, traffic={"timeout": TIMEOUT_S}, runner_probe={"enabled": False})
class TumorScope:
    """The HTTP API. Errors are JSON ``{"error": one line, "status": code}`` with a 4xx status for
    bad input (503 while no model is loaded)."""

    model = bentoml.depends(TumorModel)

    def __init__(self) -> None:
        from tumorscope.monitoring.log_files import live_path

        self.log = inference_log.InferenceLog(live_path(Path(SERVE.inference_log), REPLICA), max_bytes=SERVE.log_max_bytes,
                                              backups=SERVE.log_backups, replica=REPLICA)
        # Referred answers and a sample of the others, kept for a radiologist's reading (tumorscope review).
        self.review = review_intake.ReviewIntake(PARAMS.review)
        self._info: dict[str, Any] | None = None

    @bentoml.on_shutdown
    def close_inference_log(self) -> None:
        """Write what is still queued: the writers are background threads, which would die with the process."""
        self.log.close(timeout=5)
        self.review.close()

    async def __is_ready__(self) -> bool:
        """/readyz: the model service answers and has a model loaded."""
        try:
            info = await asyncio.wait_for(self.model.to_async.info(), READY_PROBE_TIMEOUT_S)
        except Exception:  # not started yet, timed out, unreachable: not ready, never an error
            return False
        return bool(info.get("ready"))

    # -- the model's description, cached; refreshed when the model answers with another version

    async def _model_info(self, refresh: bool = False) -> dict[str, Any]:
        if refresh or self._info is None or not self._info.get("ready"):
            self._info = await self._call(self.model.to_async.info)
        if not self._info.get("ready"):
            raise ModelUnavailable(f"no model loaded ({self._info.get('load_error')})")
        return self._info

    @staticmethod
    async def _call(method, *args: Any, **kwargs: Any) -> Any:
        """Call the model service; its failures become ModelUnavailable (503), its load shedding
        ModelOverloaded (503, retry soon). A dropped connection is retried once: every model API is
        idempotent."""
        import aiohttp

        for attempt in (1, 2):
            try:
                return await method(*args, **kwargs)
            except BentoMLException as err:
                # BentoML answers a dependency's 503 with a generic body; under load it is the batching
                # dispatcher shedding what it cannot finish within serve.max_latency_ms.
                if err.error_code == HTTPStatus.SERVICE_UNAVAILABLE:
                    raise ModelOverloaded("model service busy (adaptive batching shed the request under load): "
                                          "retry after Retry-After seconds") from None
                raise ModelUnavailable(f"model service: {refusals.one_line(str(err))}") from None
            except aiohttp.ClientConnectionError as err:
                if attempt == 2:
                    raise ModelUnavailable(f"model service unreachable: {refusals.one_line(str(err))}") from None
        raise AssertionError("unreachable")

    @staticmethod
    def _refuse(ctx: bentoml.Context, err: Exception) -> Any:
        """The ErrorBody answer (BentoML sends the context's status, so both are set)."""
        status = err.status if isinstance(err, BadRequest) else 503
        ctx.response.status_code = status
        if isinstance(err, ModelUnavailable):
            ctx.response.headers["retry-after"] = str(err.retry_after_s)
        return contract.refusal(status, {"error": refusals.one_line(str(err)), "status": status})

    # -- one image

    async def _prepare(self, path: Path, part: upload_guard.UploadPart | None, info: dict[str, Any]):
        data = await asyncio.to_thread(path.read_bytes)
        filename = part.filename if part else path.name
        content_type = part.content_type if part else None
        prepared = await asyncio.to_thread(refusals.prepare_upload, data, filename, content_type, info["spec"],
                                           SERVE.max_upload_bytes)
        return data, prepared

    async def _classify_one(self, path: Path, part: upload_guard.UploadPart | None, endpoint: str) -> dict[str, Any]:
        answer = await self._answer_one(path, part)
        self._record(endpoint, answer)
        return answer.response

    def _record(self, endpoint: str, answer: responses.Answered) -> None:
        """Log an answer that is being returned, and offer it to the review queue."""
        self.log.submit(inference_log.inference_record(endpoint, answer.response, answer.data))
        self.review.submit(answer.prepared.decoded, answer.response)

    async def _answer_one(self, path: Path, part: upload_guard.UploadPart | None) -> responses.Answered:
        info = await self._model_info()
        data, prepared = await self._prepare(path, part, info)
        answer = (await self._call(self.model.to_async.predict, prepared.pixels[np.newaxis]))[0]
        if answer["model_version"] != info["model_version"]:
            # The model was reloaded meanwhile: describe the new one, and prepare again if it wants other pixels.
            from tumorscope.inference import same_pixels

            old_spec = info["spec"]
            info = await self._model_info(refresh=True)
            if not same_pixels(old_spec, info["spec"]):
                data, prepared = await self._prepare(path, part, info)
                answer = (await self._call(self.model.to_async.predict, prepared.pixels[np.newaxis]))[0]
        response = responses.classify_response(answer, prepared, info["classes"], PARAMS.evaluate.critical_class,
                                             SERVE.alert_threshold, uuid.uuid4().hex)
        return responses.Answered(response, data, prepared)

    @bentoml.api
    async def classify(self, file: Path, ctx: bentoml.Context) -> contract.Classification:
        """One slice (PNG, JPEG or DICOM) in multipart field ``file`` -> class, calibrated
        probabilities (the network's own in raw_probabilities), alert, the conformal prediction_set,
        refer (true: a radiologist should decide) with refer_reason, and the out-of-distribution
        distance."""
        parts = upload_guard.uploads_of(ctx.request.state)
        try:
            return contract.answer(contract.Classification,
                                   await self._classify_one(file, parts[0] if parts else None, "classify"))
        except (BadRequest, ModelUnavailable) as err:
            return self._refuse(ctx, err)

    @bentoml.api
    async def classify_batch(self, files: list[Path], ctx: bentoml.Context) -> contract.BatchClassification:
        """Several slices in multipart field ``files`` (at most serve.max_batch_files); a file that
        cannot be classified gets its error in its item, the others are answered."""
        parts = upload_guard.uploads_of(ctx.request.state)
        try:
            await self._model_info()
        except ModelUnavailable as err:
            return self._refuse(ctx, err)
        if len(files) > SERVE.max_batch_files:  # UploadGuard refuses this first; kept for calls that bypass it
            return self._refuse(ctx, BadRequest(f"too many files: {len(files)} (limit {SERVE.max_batch_files})", 413))

        async def one(index: int, path: Path) -> tuple[dict[str, Any], responses.Answered | None]:
            part = parts[index] if index < len(parts) else None
            name = part.filename if part else path.name
            try:
                answer = await self._answer_one(path, part)
            except BadRequest as err:
                return {"index": index, "filename": name, "ok": False, **err.body()}, None
            return {"index": index, "filename": name, "ok": True, **answer.response}, answer

        def record(item: tuple[dict[str, Any], responses.Answered | None]) -> None:
            if item[1] is not None:
                self._record("classify_batch", item[1])

        try:
            # Each file is its own call to the batchable model API, so the files of one request are
            # batched together (and with other requests' files) by the same dispatcher. A file shed
            # under load refuses the whole request: then no answer of it is logged or queued.
            results = [result for result, _ in await responses.answered_in_full(
                (one(i, path) for i, path in enumerate(files)), record)]
        except ModelUnavailable as err:
            return self._refuse(ctx, err)
        versions = sorted({r["model_version"] for r in results if r["ok"]})
        return contract.answer(contract.BatchClassification, {
            "n_files": len(results), "n_ok": sum(r["ok"] for r in results), "n_failed": sum(not r["ok"] for r in results),
            "model_versions": versions, "results": results})

    @bentoml.api
    async def explain(self, file: Path, ctx: bentoml.Context, target_class: str | None = None) -> contract.Explanation:
        """One slice -> class, probabilities, Grad-CAM overlay (PNG, base64) and the hot region
        (with mm^2 when the DICOM gives its pixel spacing). ``target_class`` explains another class
        than the predicted one."""
        from tumorscope.models.explain import region_of_interest

        parts = upload_guard.uploads_of(ctx.request.state)
        part = parts[0] if parts else None
        try:
            info = await self._model_info()
            classes = info["classes"]
            if target_class is not None and target_class not in classes:
                raise BadRequest(f"unknown target_class {target_class!r}; the model's classes: {', '.join(classes)}", 422)
            data, prepared = await self._prepare(file, part, info)
            answer = await self._call(self.model.to_async.explain, image=prepared.pixels,
                                      class_index=None if target_class is None else classes.index(target_class))
        except (BadRequest, ModelUnavailable) as err:
            return self._refuse(ctx, err)
        heat = np.asarray(answer["heat"], dtype=np.float32)
        shown, png = await self._overlay(prepared.shown, heat)
        # The region in the field of view's pixels: the whole slice, or the body's square with body_crop.
        region = region_of_interest(heat, pixel_spacing_mm=prepared.pixel_spacing_mm,
                                    original_shape=(int(prepared.shown.shape[0]), int(prepared.shown.shape[1])))
        request_id = uuid.uuid4().hex
        # The clinician page explains without classifying first: the slice is logged like a
        # classification (the model service answered it in the same forward pass), so monitoring
        # sees the page's traffic; a slice classified and then explained is one slice to monitoring
        # (it dedupes by SHA-256).
        response = responses.classify_response(answer | {"batch_size": 1}, prepared, classes, PARAMS.evaluate.critical_class,
                                               SERVE.alert_threshold, request_id)
        self.log.submit(inference_log.inference_record("explain", response, data))
        self.review.submit(prepared.decoded, response)
        del response["embedding"], response["batch_size"]
        return contract.answer(contract.Explanation, response | {
            "explained_class": classes[answer["class_index"]], "region": region, "heatmap_shape": list(heat.shape),
            "overlay_shape": list(shown.shape), "overlay_png_base64": png})

    # -- the service

    @bentoml.api
    async def metadata(self, ctx: bentoml.Context) -> contract.Metadata:
        """Model version, classes, input size, thresholds and upload limits."""
        try:
            info = await self._model_info(refresh=True)
        except ModelUnavailable as err:
            return self._refuse(ctx, err)
        return contract.answer(contract.Metadata, {"model_version": info["model_version"], "registered_model": info["registered_model"],
                "model_ref": info["ref"], "model_source": info["source"], "loaded_at": info["loaded_at"],
                "classes": info["classes"], "input_size": info["image_size"], "preprocess": info["spec"]["preprocess"],
                "critical_class": PARAMS.evaluate.critical_class, "alert_threshold": SERVE.alert_threshold,
                "max_upload_bytes": SERVE.max_upload_bytes, "max_batch_files": SERVE.max_batch_files,
                "accepted_content_types": list(refusals.ACCEPTED_CONTENT_TYPES), "min_side": refusals.MIN_SIDE,
                "max_aspect_ratio": refusals.MAX_ASPECT_RATIO, "embedding_dims": SERVE.embedding_dims,
                "trust": info.get("trust"),
                "adaptive_batching": {"max_batch_size": SERVE.max_batch_size, "max_latency_ms": SERVE.max_latency_ms,
                                      **info["batching"]}})

    @bentoml.api
    async def health(self) -> contract.Health:
        """Model version (or why there is none), inference-log problems, batching counts. Always
        200: the status field says ok, degraded (the log is losing records) or unavailable."""
        try:
            info = await self._call(self.model.to_async.info)
        except ModelUnavailable as err:
            info = {"ready": False, "load_error": str(err)}
        log, review = self.log.status(), self.review.status()
        status = "unavailable" if not info.get("ready") else ("ok" if log["ok"] and review["ok"] else "degraded")
        return contract.answer(contract.Health, {
            "status": status, "model_version": info.get("model_version"), "model_error": info.get("load_error"),
            "inference_log": log, "review_queue": review, "batching": info.get("batching")})

    # -- readings of queued answers (a reviewer or admin key: tumorscope.api.auth.REVIEW_PATHS)

    @bentoml.api
    async def review_queue(self, ctx: bentoml.Context, status: str = "pending", limit: int = 100) -> contract.ReviewQueueAnswer:
        """The queued answers of that status (pending, labelled, harvested or all), oldest first, at most ``limit``."""
        if status not in ("all", "pending", "labelled", "harvested") or not 1 <= limit <= 10_000:
            return self._refuse(ctx, BadRequest(f"status must be all, pending, labelled or harvested and limit 1-10000 "
                                                f"(got {status!r}, {limit})", 422))
        items = await asyncio.to_thread(self.review.queue.items, status)
        return contract.answer(contract.ReviewQueueAnswer, {
            "status": status, "n_items": len(items), "items": [review_intake.item_summary(i) for i in items[:limit]]})

    @bentoml.api
    async def review_item(self, item: str, ctx: bentoml.Context) -> contract.ReviewItem:
        """One queued answer: the slice, the model's answer and set, and every reading so far."""
        from tumorscope.review.queue import UnknownItem

        try:
            found = await asyncio.to_thread(self.review.queue.item, item)
        except UnknownItem as err:
            return self._refuse(ctx, BadRequest(str(err), 404))
        detail = review_intake.item_detail(self.review.queue, found)
        return contract.answer(contract.ReviewItem, detail | await self._review_overlay(found.id))

    async def _review_overlay(self, identifier: str) -> dict[str, Any]:
        """Grad-CAM of the serving model on a queued slice, prepared as an upload of it would be.
        It is not logged or queued again: a reading is not traffic."""
        from tumorscope.inference import prepare_bytes

        try:
            info = await self._model_info()
            stored = await asyncio.to_thread(self.review.queue.slice_png, identifier)
            prepared = await asyncio.to_thread(prepare_bytes, stored, ".png", info["spec"])
            answer = await self._call(self.model.to_async.explain, image=prepared.pixels, class_index=None)
        except ModelUnavailable:
            return {"overlay_png_base64": None, "explained_by": None, "explained_class": None}
        _, png = await self._overlay(cast(np.ndarray, prepared.shown), np.asarray(answer["heat"], dtype=np.float32))
        return {"overlay_png_base64": png, "explained_by": answer["model_version"],
                "explained_class": info["classes"][answer["class_index"]]}

    @staticmethod
    async def _overlay(decoded: np.ndarray, heat: np.ndarray) -> tuple[np.ndarray, str]:
        """The slice an explanation is drawn on (at most the overlay's size) and the Grad-CAM
        overlay over it, as PNG in base64: the explain route's and the review item's."""
        from tumorscope.models.explain import overlay_png

        shown = await asyncio.to_thread(responses.overlay_slice, decoded)
        png = await asyncio.to_thread(overlay_png, shown, heat)
        return shown, base64.b64encode(png).decode("ascii")

    @bentoml.api
    async def review_label(self, item: str, label: str, ctx: bentoml.Context) -> contract.ReviewItem:
        """Record a reading (a class of the model, or 'cannot assess') under the caller's key name;
        a later reading of the same item is added to its history, never written over it."""
        from tumorscope.review.queue import BadLabel, UnknownItem

        caller = getattr(ctx.request.state, auth.CALLER_STATE, None) or {}
        try:
            found = await asyncio.to_thread(self.review.queue.label, item, label, str(caller.get("name") or "unknown"))
        except UnknownItem as err:
            return self._refuse(ctx, BadRequest(str(err), 404))
        except BadLabel as err:
            return self._refuse(ctx, BadRequest(str(err), 422))
        return contract.answer(contract.ReviewItem, review_intake.item_detail(self.review.queue, found))

    @bentoml.api
    async def reload(self, ctx: bentoml.Context, force: bool = False) -> contract.ReloadOutcome:
        """Resolve serve.model again (the champion alias may have moved) and serve what it names.
        503 when loading fails; the previous model keeps serving."""
        try:
            outcome = await self._call(self.model.to_async.reload, force=force)
            self._info = None
        except ModelUnavailable as err:
            return self._refuse(ctx, err)
        if outcome.get("error"):
            ctx.response.status_code = 503
            return contract.refusal(503, {**outcome, "status": 503, "error": (
                f"reload failed, still serving {outcome.get('model_version')}: {outcome['error']}")})
        return contract.answer(contract.ReloadOutcome, outcome)


# @bentoml.service turns the class into a bentoml Service (typed as the class, hence the cast).
# API keys first (outermost): a request without one is refused before its body is read.
cast(Any, TumorScope).add_asgi_middleware(auth.ApiKeyAuth, keys=KEYS)
cast(Any, TumorScope).add_asgi_middleware(upload_guard.UploadGuard, routes=ROUTES, max_upload_bytes=SERVE.max_upload_bytes,
                                          max_files=SERVE.max_batch_files)
# GET /health and GET /metadata answered as their POST (probes and load balancers send GET).
cast(Any, TumorScope).add_asgi_middleware(probes.GetAsPost, paths=READ_ONLY)
# The OpenAPI document with the error answers, the GETs and the API keys (tumorscope.api.openapi).
cast(Any, TumorScope).add_asgi_middleware(openapi.OpenApiDocument, errors=ERRORS, get_paths=READ_ONLY,
                                          keys_enabled=KEYS.enabled)


def clinician_page():
    """The page a clinician drops a slice on (serving/static/index.html), at /ui/."""
    from starlette.staticfiles import StaticFiles

    return StaticFiles(directory=Path(__file__).resolve().parent / "static", html=True)


cast(Any, TumorScope).mount_asgi_app(clinician_page(), path="/ui", name="ui")

