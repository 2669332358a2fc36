"""What an answer says: the class and its probabilities, the tumour alert, the image's statistics,
warnings about converted inputs, and the slice an explanation is drawn on."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Any, NamedTuple, TypeVar, cast

import numpy as np

from tumorscope.inference import PreparedImage
from tumorscope.monitoring.features import image_features

# Longest side of the slice an explanation overlay is drawn on (the original can be 8192 px).
OVERLAY_MAX_SIDE = 512
Answer = TypeVar("Answer")


class Answered(NamedTuple):
    """One slice's answer, with what recording it needs: the upload's bytes and the prepared image."""

    response: dict[str, Any]
    data: bytes
    prepared: PreparedImage


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


NO_TRUST_WARNING = ("this model has no trust state (calibration, prediction set, referral): its probabilities are the "
                    "network's own and nothing says when not to trust them; retrain it with this version")


def trusted_result(model_answer: dict[str, Any], classes: list[str], critical_class: str,
                   alert_threshold: float) -> dict[str, Any]:
    """``classify_result`` on the calibrated probabilities, with the network's own
    (``raw_probabilities``), the conformal prediction set, ``refer`` with its one-line reason and the
    out-of-distribution distance. The alert keeps its meaning (the tumour probability reached the
    threshold); ``refer`` says whether the answer can be relied on."""
    trust = model_answer.get("trust")
    raw = dict(zip(classes, (float(p) for p in model_answer["probabilities"]), strict=True))
    if trust is None:
        return classify_result(model_answer["probabilities"], classes, critical_class, alert_threshold) | {
            "raw_probabilities": raw, "calibrated": False, "prediction_set": None, "refer": None, "refer_reason": None,
            "ood": None, "ood_distance": None, "orientation": None}
    calibrated = [trust["calibrated_probabilities"][c] for c in classes]
    return classify_result(calibrated, classes, critical_class, alert_threshold) | {
        "raw_probabilities": raw, "calibrated": True, "prediction_set": list(trust["prediction_set"]),
        "refer": bool(trust["refer"]), "refer_reason": trust["refer_reason"], "ood": bool(trust["ood"]),
        "ood_distance": float(trust["ood_distance"]), "orientation": trust.get("orientation")}


def answer_warnings(prepared: PreparedImage, model_answer: dict[str, Any]) -> list[str]:
    return source_warnings(prepared.source_mode) + ([NO_TRUST_WARNING] if model_answer.get("trust") is None else [])


def classify_response(model_answer: dict[str, Any], prepared: PreparedImage, classes: list[str], critical_class: str,
                      alert_threshold: float, request_id: str) -> dict[str, Any]:
    """The JSON answer for one classified image."""
    return {"request_id": request_id, "model_version": model_answer["model_version"],
            **trusted_result(model_answer, classes, critical_class, alert_threshold),
            "image": image_statistics(prepared), "embedding": [float(v) for v in model_answer["embedding"]],
            "warnings": answer_warnings(prepared, model_answer), "batch_size": int(model_answer["batch_size"])}


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


async def answered_in_full(calls: Iterable[Awaitable[Answer]], record: Callable[[Answer], None]) -> list[Answer]:
    """Await every call, then record each answer, but only when none raised: a request refused as a
    whole (503) leaves nothing in the inference log or the review queue for answers it never
    returned. Every call is awaited before the first error is raised, so none records later."""
    import asyncio

    results = await asyncio.gather(*calls, return_exceptions=True)
    failure = next((r for r in results if isinstance(r, BaseException)), None)
    if failure is not None:
        raise failure
    answers = cast("list[Answer]", results)
    for answer in answers:
        record(answer)
    return answers
