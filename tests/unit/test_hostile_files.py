"""No single file can stop the manifest: a hostile or exotic file in a class folder is either
decoded to 8-bit greyscale or quarantined with a one-line reason, and the rest goes on."""

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers.images import textured_slice, write_png
from helpers.params import section
from tumorscope.config import WindowConfig
from tumorscope.data import images, manifest
from tumorscope.data.images import MAX_PIXELS, UnreadableImage, decode_greyscale, error_reason
from tumorscope.data.manifest import build_manifest, describe_file, quarantine_table

WINDOW = section(WindowConfig)
N_GOOD = 4


def bomb_png(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose IHDR then claims width x height pixels (CRC fixed): a few dozen bytes
    that would ask a naive decoder for width*height bytes of memory."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def _slice(seed: int = 1, size: int = 40) -> np.ndarray:
    return textured_slice(np.random.default_rng(seed), size=size)


def _save(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _truncated_png() -> bytes:
    return _save(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)), "PNG")[:200]


def _float_tiff_with_nan() -> bytes:
    values = _slice().astype(np.float32) * 3.5 - 100.0
    values[0, :5] = np.nan
    values[1, :5] = np.inf
    return _save(Image.fromarray(values), "TIFF")


def _multiframe(fmt: str) -> bytes:
    frames = [Image.fromarray(_slice(seed)) for seed in range(3)]
    return _save(frames[0], fmt, save_all=True, append_images=frames[1:])


def _dicom(pixels: np.ndarray, samples: int = 1) -> bytes:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("x.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    frames = pixels.shape[0] if pixels.ndim == 3 + (samples > 1) else 1
    ds.Rows, ds.Columns = pixels.shape[-2 - (samples > 1):][:2]
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.SamplesPerPixel, ds.PixelRepresentation = samples, 0
    ds.PhotometricInterpretation = "RGB" if samples > 1 else "MONOCHROME2"
    if samples > 1:
        ds.PlanarConfiguration = 0
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _dataset_with(tmp_path: Path, name: str, content: bytes) -> Path:
    """raw/<Tumor>/ with N_GOOD good slices and one extra file; raw/Normal with good slices."""
    raw = tmp_path / "raw"
    for label in ("Normal", "Tumor"):
        for i in range(N_GOOD):
            write_png(raw / label / f"good-{i}.png", _slice(seed=i + 10 * len(label)))
    (raw / "Tumor" / name).write_bytes(content)
    return raw


def _row_for(frame, name: str):
    rows = frame[frame["path"].str.endswith("/" + name)]
    assert len(rows) == 1
    return rows.iloc[0]


def _assert_rest_readable(frame, name: str) -> None:
    assert len(frame) == 2 * N_GOOD + 1  # one row per file, the hostile one included
    others = frame[~frame["path"].str.endswith("/" + name)]
    assert others["readable"].all() and (others["error"] == "").all()


QUARANTINED = [
    ("bomb.png", lambda: bomb_png(60_000, 60_000), "too large"),  # over Pillow's own hard limit
    ("bomb-warn.png", lambda: bomb_png(10_000, 10_000), "too large"),  # Pillow only warns here
    ("bomb-ours.png", lambda: bomb_png(9_000, 9_000), "too large: 9000x9000"),  # under Pillow's, over ours
    ("truncated.png", _truncated_png, "corrupt image"),
    ("empty.png", lambda: b"", "empty file"),
    ("notes.png", lambda: b"scanner log, not a picture\n" * 10, "not an image"),
    ("random.dcm", lambda: np.random.default_rng(3).integers(0, 256, 2048, dtype=np.uint8).tobytes(), "DICOM"),
    # Pillow would hand an EPS to Ghostscript: not an accepted format, whatever its name.
    ("script.png", lambda: b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n", "not an image"),
    ("zero-size.png", lambda: bomb_png(0, 5), "not an image"),  # Pillow rejects a 0-wide header
    ("colour.dcm", lambda: _dicom(np.zeros((4, 4, 3)), samples=3), "colour DICOM"),
]


@pytest.mark.parametrize(("name", "make", "reason"), QUARANTINED, ids=[q[0] for q in QUARANTINED])
def test_hostile_file_is_quarantined_and_the_rest_goes_on(tmp_path, name, make, reason):
    raw = _dataset_with(tmp_path, name, make())
    frame = build_manifest(raw, WINDOW)
    _assert_rest_readable(frame, name)
    row = _row_for(frame, name)
    assert not row["readable"] and reason in row["error"]
    assert "\n" not in row["error"] and len(row["error"]) <= images.MAX_REASON_CHARS
    assert len(quarantine_table(frame)) == 1


EXOTIC = [
    ("one-bit.png", lambda: _save(Image.fromarray(_slice() > 128), "PNG"), "1"),
    ("palette.png", lambda: _save(Image.fromarray(_slice()).convert("P"), "PNG"), "P"),
    ("grey-alpha.png", lambda: _save(Image.fromarray(_slice()).convert("LA"), "PNG"), "LA"),
    ("rgba.png", lambda: _save(Image.fromarray(_slice()).convert("RGBA"), "PNG"), "RGBA"),
    ("cmyk.jpg", lambda: _save(Image.fromarray(_slice()).convert("CMYK"), "JPEG"), "CMYK"),
    ("deep.png", lambda: _save(Image.fromarray(_slice().astype(np.uint16) * 250), "PNG"), "I;16"),
    ("float.tif", _float_tiff_with_nan, "F"),
    ("frames.tif", lambda: _multiframe("TIFF"), "L"),
    ("frames.gif", lambda: _multiframe("GIF"), "P"),
    ("frames.dcm", lambda: _dicom(np.stack([np.full((40, 40), v) for v in (0, 1064, 2000)])), "DICOM"),
]


@pytest.mark.parametrize(("name", "make", "mode"), EXOTIC, ids=[e[0] for e in EXOTIC])
def test_exotic_modes_become_8bit_grey(tmp_path, name, make, mode):
    raw = _dataset_with(tmp_path, name, make())
    frame = build_manifest(raw, WINDOW)
    _assert_rest_readable(frame, name)
    row = _row_for(frame, name)
    assert row["readable"] and row["error"] == "" and row["mode"] == mode
    assert (row["width"], row["height"]) == (40, 40)
    assert 0 <= row["min"] <= row["max"] <= 255 and np.isfinite(row["mean"])
    pixels, _ = images.read_greyscale(raw / "Tumor" / name, WINDOW)
    assert pixels.dtype == np.uint8 and pixels.shape == (40, 40)
    if name == "frames.dcm":  # the middle frame (40 HU: the window's level) is the one kept
        assert (pixels == 128).all()


def test_bomb_raises_before_any_pixel_is_decoded(monkeypatch):
    with pytest.raises(UnreadableImage, match="too large"):
        decode_greyscale(bomb_png(60_000, 60_000), ".png", WINDOW)
    # With Pillow's own limit switched off (a global any library may change), ours still holds:
    # the header is checked before load(), which would otherwise allocate 100 MB and then fail.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    with pytest.raises(UnreadableImage, match=f"too large: 10000x10000 pixels \\(limit {MAX_PIXELS}"):
        decode_greyscale(bomb_png(10_000, 10_000), ".png", WINDOW)


def test_any_decoder_exception_quarantines_only_that_file(tmp_path, monkeypatch):
    raw = _dataset_with(tmp_path, "odd.png", _save(Image.fromarray(_slice()), "PNG"))
    real_decode = manifest.decode_greyscale

    def flaky_decode(data, suffix, window):
        if data == (raw / "Tumor" / "odd.png").read_bytes():
            raise ZeroDivisionError("a decoder bug\non two lines")
        return real_decode(data, suffix, window)

    monkeypatch.setattr(manifest, "decode_greyscale", flaky_decode)
    frame = build_manifest(raw, WINDOW)
    _assert_rest_readable(frame, "odd.png")
    row = _row_for(frame, "odd.png")
    assert not row["readable"] and row["error"] == "ZeroDivisionError: a decoder bug on two lines"
    assert len(row["sha256"]) == 64


def test_file_that_cannot_be_read_is_a_quarantined_row(tmp_path):
    row = describe_file(tmp_path / "Tumor" / "vanished.png", "Tumor", WINDOW)
    assert not row["readable"] and row["error"].startswith("cannot read file (FileNotFoundError")


def test_oversized_file_is_hashed_but_not_decoded(tmp_path, monkeypatch):
    path = write_png(tmp_path / "Tumor" / "huge.png", _slice())
    monkeypatch.setattr(images, "MAX_FILE_BYTES", 100)
    row = describe_file(path, "Tumor", WINDOW)
    assert not row["readable"] and row["error"].startswith("file too large")
    assert len(row["sha256"]) == 64


def test_reason_is_one_clipped_line():
    reason = error_reason(OSError("x" * 1000 + "\nsecond line"))
    assert reason.startswith("OSError: xxx") and len(reason) == 300 and "\n" not in reason
    assert error_reason(UnreadableImage("empty file")) == "empty file"
