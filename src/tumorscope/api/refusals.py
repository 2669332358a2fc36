"""What the service refuses, and why: every refusal is a ``BadRequest`` with a 4xx status and one line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tumorscope.inference import PreparedImage

# Part content types accepted for an image file. Browsers and curl send image/* for PNG/JPEG,
# application/dicom or application/octet-stream for .dcm; a part without one is taken as octet-stream.
ACCEPTED_CONTENT_TYPES = ("image/*", "application/dicom", "application/octet-stream")
# A CT slice is a few hundred pixels a side and roughly square; anything else is not one (a
# thumbnail, a scout strip, a screenshot of a report).
MIN_SIDE = 16
MAX_ASPECT_RATIO = 4.0
MAX_FILENAME_BYTES = 200  # file systems allow 255 bytes a name; BentoML adds a prefix


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


