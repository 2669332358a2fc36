"""The service's answers as pydantic models: the OpenAPI document BentoML serves (``/docs.json``, the
Swagger UI at ``/``) describes every field from them, and every answer is validated against them
before it leaves, so the document cannot drift from what the service sends.

The models forbid fields they do not declare: a field added to an answer without its description
here fails the tests (``tests/integration/test_service.py`` checks real answers against the served
document) rather than going undocumented.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Answer(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, serialize_by_alias=True)


class ErrorBody(BaseModel):
    """Every refusal: a 4xx for a request the service will not take (400 malformed, 401 no or a wrong
    API key, 403 an admin route with a user key, 404/405 no such route or method, 413 too large,
    415 not an image, 422 not a usable CT slice), 503 while no model can answer. ``reload``'s 503
    also carries the reload outcome's fields."""

    model_config = ConfigDict(extra="allow")
    error: str = Field(description="what is wrong and where, in one line")
    status: int = Field(description="the HTTP status, repeated")


class ImageStatistics(_Answer):
    """The slice as the model saw it (decoded and prepared as training prepared its cache); the
    intensity features are the ones drift monitoring compares."""

    mean: float = Field(description="mean grey level of the model input (0-255)")
    std: float = Field(description="standard deviation of the grey levels")
    p1: float = Field(description="1st percentile of the grey levels")
    p50: float = Field(description="median grey level")
    p99: float = Field(description="99th percentile of the grey levels")
    contrast: float = Field(description="p99 - p1")
    sharpness: float = Field(description="variance of the 4-neighbour Laplacian")
    noise: float = Field(description="Immerkaer's noise standard deviation estimate")
    height: float = Field(description="rows of the file as sent")
    width: float = Field(description="columns of the file as sent")
    bit_depth: float = Field(description="bits per sample of the file (16 for DICOM)")
    min: float = Field(description="lowest grey level of the model input")
    max: float = Field(description="highest grey level of the model input")
    original_shape: list[int] = Field(description="[rows, columns] of the file as sent")
    model_input_shape: list[int] = Field(description="[rows, columns] the model saw")
    source_mode: str = Field(description="Pillow mode of the decoded file (L, RGB, I;16, ...) or DICOM")
    pixel_spacing_mm: list[float] | None = Field(description="DICOM [row, column] pixel spacing; null without one")


class _Judged(_Answer):
    """What every answer on one slice says: the class, calibrated probabilities, the alert, and
    whether to trust it."""

    request_id: str = Field(description="this answer's id, also in the inference log")
    model_version: str = Field(description="the model that answered, e.g. tumorscope-kidney-ct/3")
    predicted_class: str = Field(alias="class", description="the most probable class")
    confidence: float = Field(description="its (calibrated) probability")
    probabilities: dict[str, float] = Field(description="per class; calibrated when calibrated is true")
    critical_class: str = Field(description="the class whose miss is costly (evaluate.critical_class)")
    critical_probability: float | None = Field(description="its probability; null when the model lacks that class")
    alert_threshold: float = Field(description="serve.alert_threshold")
    alert: bool = Field(description="critical_probability >= alert_threshold")
    raw_probabilities: dict[str, float] = Field(description="the network's own probabilities, before calibration")
    calibrated: bool = Field(description="false for a model without a trust state")
    prediction_set: list[str] | None = Field(description="the conformal prediction set; null without a trust state")
    refer: bool | None = Field(description="true: do not rely on this answer, a radiologist should decide")
    refer_reason: str | None = Field(description="why it is referred, in one line")
    ood: bool | None = Field(description="referred as unlike the training slices")
    ood_distance: float | None = Field(description="feature-space distance to the training slices")
    orientation: str | None = Field(description="axial, coronal or other, estimated from the body outline; "
                                                "null without a trust state")
    image: ImageStatistics
    warnings: list[str] = Field(description="what was converted (colour, 16-bit) or is missing (trust state)")


class Classification(_Judged):
    """One classified slice."""

    embedding: list[float] = Field(description="a fixed random projection of the penultimate layer (serve.embedding_dims)")
    batch_size: int = Field(description="images in the model batch this slice ran in (adaptive batching)")


class BatchItem(Classification):
    index: int = Field(description="position of the file in the request")
    filename: str | None = Field(description="the file's name as sent")
    ok: Literal[True] = True


class BatchFailure(_Answer):
    index: int = Field(description="position of the file in the request")
    filename: str | None = Field(description="the file's name as sent")
    ok: Literal[False] = False
    error: str = Field(description="why this file could not be classified, in one line")
    status: int = Field(description="the HTTP status the file alone would have had")


class BatchClassification(_Answer):
    """One result per file, in order; a bad file gets its error in its item, the others are answered."""

    n_files: int
    n_ok: int
    n_failed: int
    model_versions: list[str] = Field(description="the models that answered (two while a reload lands)")
    results: list[BatchItem | BatchFailure]


class Box(_Answer):
    x0: int = Field(description="left column (inclusive)")
    y0: int = Field(description="top row (inclusive)")
    x1: int = Field(description="right column (exclusive)")
    y1: int = Field(description="bottom row (exclusive)")


class Point(_Answer):
    x: float
    y: float


class Region(_Answer):
    """The Grad-CAM hot region: the largest connected area at or above ``threshold``, in the pixels
    of the field of view (heat map), and in the file's pixels (``*_original``)."""

    bbox: Box | None = Field(description="null when no pixel reaches the threshold")
    area_px: int
    area_mm2: float | None = Field(description="from the DICOM pixel spacing; null without one")
    centroid: Point | None
    side: Literal["left", "right", "centre"] | None = Field(description="in image coordinates")
    patient_side: Literal["left", "right", "centre"] | None = Field(
        description="the patient's side (radiological convention: image left is patient right)")
    quadrant: str | None = Field(description="upper-left, lower-right, ... in image coordinates")
    n_regions: int = Field(description="connected areas at the threshold (only the largest is described)")
    threshold: float
    bbox_original: Box | None = None
    area_px_original: int | None = None


class Explanation(_Judged):
    """The slice's classification, the Grad-CAM overlay and its region."""

    explained_class: str = Field(description="the class the heat map is for (target_class, else the predicted one)")
    region: Region
    heatmap_shape: list[int] = Field(description="[rows, columns] of the heat map (the model input's)")
    overlay_shape: list[int] = Field(description="[rows, columns] of the overlay PNG (the slice, at most 512 a side)")
    overlay_png_base64: str = Field(description="the slice with the heat map over it, PNG, base64")


class TrustSummary(_Answer):
    temperature: float = Field(description="temperature-scaling factor of the logits")
    alpha: float = Field(description="conformal miscoverage")
    coverage_target: float = Field(description="1 - alpha")
    score: str = Field(description="conformal score (e.g. aps, lac)")
    class_conditional: bool
    calibration_groups: int = Field(description="duplicate groups (about series) the thresholds were fitted on")
    ood_quantile: float
    ood_distance_threshold: float | None
    intensity_quantile: float


class BatchingCounts(_Answer):
    batches: int = Field(description="model batches run since the model service started")
    images: int
    largest_batch: int
    batch_size_histogram: dict[str, int] = Field(description="batch size -> how many batches had it")


class AdaptiveBatching(BatchingCounts):
    max_batch_size: int
    max_latency_ms: int


class Metadata(_Answer):
    """The served model and the service's limits."""

    model_version: str
    registered_model: str
    model_ref: str = Field(description="serve.model: an alias, a version or a URI")
    model_source: dict[str, Any] = Field(description="registry name, version, alias, run id, path")
    loaded_at: str
    classes: list[str]
    input_size: int = Field(description="side of the square model input, pixels")
    preprocess: dict[str, Any] = Field(description="how a file is prepared (the training cache's settings)")
    critical_class: str
    alert_threshold: float
    max_upload_bytes: int
    max_batch_files: int
    accepted_content_types: list[str]
    min_side: int
    max_aspect_ratio: float
    embedding_dims: int
    trust: TrustSummary | None
    adaptive_batching: AdaptiveBatching


class InferenceLogStatus(_Answer):
    path: str = Field(description="the file this replica appends to (rotated by size: serve.log_max_bytes)")
    replica: str | None = Field(description="this replica's id ($TUMORSCOPE_REPLICA_ID, serve.replica_id)")
    ok: bool = Field(description="false once a record was dropped or failed")
    written: int
    dropped_queue_full: int
    failed: int
    queued: int
    last_error: str | None
    last_error_at: str | None


class ReviewReading(_Answer):
    label: str = Field(description="a class of the model that answered, or 'cannot assess'")
    reviewer: str = Field(description="the reviewer's key name (never the key)")
    at: str = Field(description="when (UTC, ISO 8601)")
    model_version: str = Field(description="the model whose answer was read")
    previous: str | None = Field(description="the label this reading replaced (the history is kept)")


class ReviewItemSummary(_Answer):
    item: str = Field(description="the item's id: a digest of its pixels (the same slice twice is one item)")
    received_at: str
    why: Literal["referred", "sampled"] = Field(
        description="referred: the model's answer was referred; sampled: drawn at review.sample_rate")
    model_version: str
    model_class: str | None = Field(description="the model's answer")
    refer_reason: str | None
    label: str | None = Field(description="the latest reading, null while pending")
    n_readings: int


class ReviewQueueAnswer(_Answer):
    status: Literal["all", "pending", "labelled", "harvested"]
    n_items: int = Field(description="items of that status in the queue (the list holds at most `limit`, oldest first)")
    items: list[ReviewItemSummary]


class ReviewItem(ReviewItemSummary):
    request_id: str
    classes: list[str] = Field(description="the labels a reading may give, besides 'cannot assess'")
    probabilities: dict[str, float] = Field(description="the model's calibrated probabilities")
    prediction_set: list[str] | None
    readings: list[ReviewReading] = Field(description="every reading, oldest first")
    slice_png_base64: str = Field(description="the slice as decoded (8-bit greyscale PNG)")
    overlay_png_base64: str | None = Field(
        None, description="review_item only: Grad-CAM of the model serving now over the slice (PNG, base64); null "
                          "from review_label or while no model is loaded")
    explained_by: str | None = Field(None, description="the model version the overlay explains (it may be newer than "
                                                       "model_version, which answered)")
    explained_class: str | None = Field(None, description="the class the overlay explains: that model's answer")


class ReviewQueueStatus(_Answer):
    queue_dir: str = Field(description="where this replica queues answers for review (review.queue_dir)")
    ok: bool = Field(description="false once a slice to review could not be written")
    referred: int = Field(description="referred answers queued since the service started (a slice already queued: not again)")
    sampled: int = Field(description="other answers queued, drawn at review.sample_rate")
    failed: int
    last_error: str | None


class Health(_Answer):
    """Always 200: ``status`` says it."""

    status: Literal["ok", "degraded", "unavailable"] = Field(
        description="ok; degraded: the inference log or the review queue is losing records; unavailable: no model loaded")
    model_version: str | None
    model_error: str | None = Field(description="why no model is loaded")
    inference_log: InferenceLogStatus
    review_queue: ReviewQueueStatus
    batching: BatchingCounts | None


class ReloadOutcome(_Answer):
    reloaded: bool = Field(description="a model was loaded")
    changed: bool = Field(description="the served version changed")
    model_version: str | None
    previous_version: str | None = None
    error: str | None


def answer(model: type[BaseModel], body: dict[str, Any]) -> Any:
    """``body`` as ``model`` (BentoML serialises model instances); raises if it breaks the contract."""
    return model.model_validate(body)


def refusal(status: int, body: dict[str, Any]) -> Any:
    """An error answer that bypasses the route's success model (BentoML passes a Response through)."""
    from starlette.responses import JSONResponse

    return JSONResponse(ErrorBody.model_validate(body).model_dump(), status_code=status)
