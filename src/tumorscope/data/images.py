"""Decode any supported image file (PNG/JPEG/TIFF/BMP/DICOM) into one 8-bit greyscale array.

Every stage (manifest, preprocessing, serving) reads pixels through ``read_greyscale`` so that a
slice looks the same to training and to the service.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from tumorscope.config import WindowConfig

DICOM_SUFFIXES = {".dcm", ".dicom"}


class UnreadableImage(ValueError):
    """The file is not a decodable image; the message is the reason recorded in quarantine."""


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
        pixels = ds.pixel_array.astype(np.float32)
    except Exception as err:  # pydicom raises many types for broken files
        raise UnreadableImage(f"not a readable DICOM image ({type(err).__name__}: {err})") from None
    if pixels.ndim == 3:  # multi-frame: take the middle frame (one slice per manifest row)
        pixels = pixels[pixels.shape[0] // 2]
    slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
    intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
    return window_hu(pixels * slope + intercept, window)


def _to_uint8_grey(image) -> np.ndarray:
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # High bit-depth greyscale: stretch its own range to 8 bits.
        arr = np.asarray(image, dtype=np.float32)
        low, high = float(arr.min()), float(arr.max())
        if high <= low:
            return np.zeros(arr.shape, dtype=np.uint8)
        return np.rint((arr - low) * (255.0 / (high - low))).astype(np.uint8)
    if image.mode != "L":
        image = image.convert("L")
    return np.asarray(image, dtype=np.uint8)


def decode_greyscale(data: bytes, suffix: str, window: WindowConfig) -> tuple[np.ndarray, str]:
    """Decode image bytes to (uint8 HxW array, source mode). Raises UnreadableImage."""
    if not data:
        raise UnreadableImage("empty file")
    if _is_dicom(data, suffix):
        return _decode_dicom(data, window), "DICOM"
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # force a full decode so truncated files fail here, not later
            mode = image.mode
            if getattr(image, "n_frames", 1) > 1:
                image.seek(0)
            return _to_uint8_grey(image), mode
    except UnidentifiedImageError:
        raise UnreadableImage("not an image file (format not recognised)") from None
    except (OSError, ValueError, SyntaxError) as err:
        raise UnreadableImage(f"corrupt image ({err})") from None


def read_greyscale(path: str | Path, window: WindowConfig) -> tuple[np.ndarray, str]:
    """Read a file from disk; see ``decode_greyscale``."""
    path = Path(path)
    return decode_greyscale(path.read_bytes(), path.suffix, window)
