"""Decode any supported image file (PNG/JPEG/TIFF/BMP/DICOM) into one 8-bit greyscale array.

Every stage (manifest, preprocessing, serving) reads pixels through ``read_greyscale`` so that a
slice looks the same to training and to the service.

Files come from outside (a downloaded data set, an upload), so decoding is defensive: the declared
size is checked before any pixel is decoded (a few-KB "decompression bomb" can claim billions of
pixels), only raster formats a CT slice plausibly comes in are opened, and whatever a decoder
raises on one file becomes ``UnreadableImage`` with a one-line reason, never a crash.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np

from tumorscope.config import WindowConfig

DICOM_SUFFIXES = {".dcm", ".dicom"}
# Largest image decoded, in pixels (8192 x 8192): CT slices are 512 x 512, scans and exports a few
# thousand pixels a side. Checked against the header before decoding, so a bomb costs nothing.
MAX_PIXELS = 64 * 1024 * 1024
# Largest file read into memory. A 16-bit 8192 x 8192 slice stored uncompressed is 128 MiB.
MAX_FILE_BYTES = 256 * 1024 * 1024
# Formats Pillow may open, chosen by content, not by extension. Left out on purpose: EPS (Pillow
# runs Ghostscript on it), and the many legacy/scientific formats no CT export uses, each one
# more parser exposed to a hostile file.
PIL_FORMATS = ("PNG", "JPEG", "JPEG2000", "TIFF", "BMP", "DIB", "GIF", "WEBP", "PPM")
# High bit-depth greyscale modes: their own value range is stretched to 8 bits.
_DEEP_MODES = ("I", "F")
MAX_REASON_CHARS = 300


class UnreadableImage(ValueError):
    """The file is not a decodable image; the message is the reason recorded in quarantine."""


def error_reason(err: BaseException, limit: int = MAX_REASON_CHARS) -> str:
    """One line for the quarantine report: the message of an UnreadableImage (already a reason),
    else "<ExceptionType>: message"; whitespace collapsed (decoders put newlines in messages,
    the CLI and the CSV want one line) and clipped to ``limit`` characters."""
    text = str(err) if isinstance(err, UnreadableImage) else f"{type(err).__name__}: {err}"
    text = " ".join(text.split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _too_large(width: int, height: int, frames: int = 1) -> UnreadableImage:
    frames_note = f" x {frames} frames" if frames > 1 else ""
    return UnreadableImage(f"image too large: {width}x{height} pixels{frames_note} (limit {MAX_PIXELS} pixels)")


def check_declared_size(width: int, height: int, frames: int = 1) -> None:
    """Reject a header whose pixel count is empty or over MAX_PIXELS, before anything is decoded."""
    if width <= 0 or height <= 0:
        raise UnreadableImage(f"image has no pixels ({width}x{height})")
    if width * height * max(frames, 1) > MAX_PIXELS:
        raise _too_large(width, height, frames)


def window_hu(hu: np.ndarray, window: WindowConfig) -> np.ndarray:
    """Map Hounsfield units through a display window (level/width) to uint8."""
    low = window.level - window.width / 2.0
    scaled = (np.asarray(hu, dtype=np.float64) - low) / window.width * 255.0
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _is_dicom(data: bytes, suffix: str) -> bool:
    # DICOM Part 10 files carry "DICM" after a 128-byte preamble; extension alone is not trusted.
    return data[128:132] == b"DICM" or suffix.lower() in DICOM_SUFFIXES


def _decode_dicom(data: bytes, window: WindowConfig) -> np.ndarray:
    import pydicom

    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
        if int(ds.get("SamplesPerPixel", 1) or 1) > 1:
            # A colour DICOM is a screenshot or a photo, not a CT slice in Hounsfield units.
            raise UnreadableImage(f"colour DICOM (SamplesPerPixel={ds.SamplesPerPixel}): not a CT slice")
        rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        if rows and columns:  # absent: pixel_array below fails with pydicom's own reason
            # One frame is decoded (the middle one: one slice per row), so only its size counts.
            check_declared_size(columns, rows)
        if frames > 1:
            ds.pixel_array_options(index=frames // 2)
        pixels = ds.pixel_array.astype(np.float32)
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    except UnreadableImage:
        raise
    except Exception as err:  # pydicom raises many types for broken files
        raise UnreadableImage(f"not a readable DICOM image ({error_reason(err)})") from None
    if pixels.ndim == 3:  # a decoder that ignored the frame index: take the middle frame
        pixels = pixels[pixels.shape[0] // 2]
    return window_hu(pixels * slope + intercept, window)


def _stretch_to_uint8(arr: np.ndarray) -> np.ndarray:
    """Stretch a float array's own finite range to 0..255 (NaN/inf, e.g. in float TIFFs, -> 0)."""
    finite = np.isfinite(arr)
    if not finite.any():
        return np.zeros(arr.shape, dtype=np.uint8)
    low, high = float(arr[finite].min()), float(arr[finite].max())
    if high <= low:
        return np.zeros(arr.shape, dtype=np.uint8)
    scaled = (np.where(finite, arr, low) - low) * (255.0 / (high - low))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _to_uint8_grey(image) -> np.ndarray:
    if image.mode.startswith(_DEEP_MODES):
        return _stretch_to_uint8(np.asarray(image, dtype=np.float32))
    if image.mode != "L":
        try:
            image = image.convert("L")
        except ValueError:
            # Pillow converts some modes (e.g. "La") only by way of RGB; the rest cannot be shown.
            try:
                image = image.convert("RGB").convert("L")
            except ValueError:
                raise UnreadableImage(f"unsupported pixel mode {image.mode!r}: no greyscale rendering") from None
    return np.asarray(image, dtype=np.uint8)


def _pil_formats() -> list[str]:
    """PIL_FORMATS this Pillow build has (one built without e.g. WebP raises KeyError on its name)."""
    from PIL import Image

    Image.init()
    return [name for name in PIL_FORMATS if name in Image.OPEN]


def _decode_pil(data: bytes) -> tuple[np.ndarray, str]:
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            # Pillow warns (and only warns) between its own two bomb limits: make it an error.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=_pil_formats()) as image:
                # Image.open reads only the header: check the declared size before load() decodes.
                check_declared_size(*image.size)
                image.load()  # force a full decode so truncated files fail here, not later
                # Multi-frame files (GIF, TIFF, APNG) stay on frame 0: one slice per file.
                return _to_uint8_grey(image), image.mode
    except UnreadableImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise UnreadableImage(f"image too large ({error_reason(err)})") from None
    except UnidentifiedImageError:
        raise UnreadableImage(f"not an image file (format not recognised; supported: {', '.join(PIL_FORMATS)})") from None
    except Exception as err:  # decoders raise OSError, ValueError, SyntaxError, struct.error, ...
        raise UnreadableImage(f"corrupt image ({error_reason(err)})") from None


def decode_greyscale(data: bytes, suffix: str, window: WindowConfig) -> tuple[np.ndarray, str]:
    """Decode image bytes to (uint8 HxW array, source mode). Raises UnreadableImage."""
    if not data:
        raise UnreadableImage("empty file")
    if _is_dicom(data, suffix):
        pixels, mode = _decode_dicom(data, window), "DICOM"
    else:
        pixels, mode = _decode_pil(data)
    # Whatever a decoder returned, later stages need one non-empty 2-D slice.
    if pixels.ndim != 2 or pixels.size == 0:
        raise UnreadableImage(f"not a single greyscale slice (decoded shape {pixels.shape})")
    return pixels, mode


def check_file_size(size: int) -> None:
    """Refuse to read a file larger than MAX_FILE_BYTES into memory."""
    if size > MAX_FILE_BYTES:
        raise UnreadableImage(f"file too large: {size} bytes (limit {MAX_FILE_BYTES} bytes)")


def read_greyscale(path: str | Path, window: WindowConfig) -> tuple[np.ndarray, str]:
    """Read a file from disk; see ``decode_greyscale``."""
    path = Path(path)
    check_file_size(path.stat().st_size)
    return decode_greyscale(path.read_bytes(), path.suffix, window)


def dicom_pixel_spacing(data: bytes) -> tuple[float, float] | None:
    """(row, column) spacing in mm from a DICOM's PixelSpacing, or None when absent or malformed
    (areas are then reported in pixels only, never in guessed millimetres)."""
    import pydicom

    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True, stop_before_pixels=True)
        row, column = (float(v) for v in ds.PixelSpacing)
    except Exception:  # absent tag, wrong multiplicity, text where numbers belong
        return None
    return (row, column) if row > 0 and column > 0 else None
