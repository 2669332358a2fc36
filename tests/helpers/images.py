"""Test images: textured PNGs, phantom slices as PNG, CT DICOM files."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from helpers.params import section


def write_png(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def textured_slice(rng: np.random.Generator, size: int = 48) -> np.ndarray:
    """A random, non-blank greyscale image whose perceptual hash differs from other draws."""
    coarse = rng.integers(0, 256, (6, 6), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC))


def phantom_pngs(n_per_class: int = 2, size: int = 96) -> dict[str, bytes]:
    """Synthetic kidney CT slices of every class, as PNG files."""
    from tumorscope.config import CANONICAL_CLASSES, WindowConfig
    from tumorscope.data.phantom import image_rng, render_slice

    files = {}
    for label in CANONICAL_CLASSES:
        for k in range(1, n_per_class + 1):
            image, _, _ = render_slice(image_rng(123, label, k), label, size, 12.0, 0.7, section(WindowConfig))
            files[f"phantom-{label}-{k}.png"] = png_bytes(image)
    return files


def dicom_bytes(hu: np.ndarray | None, spacing: tuple[float, float] | None = (0.7, 0.8)) -> bytes:
    """A CT DICOM file in Hounsfield units (stored = HU + 1024); ``hu`` None: a header-only file
    without pixel data; ``spacing`` None: no PixelSpacing."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.2")  # CT Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("ct.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.Modality = "CT"
    if hu is not None:
        stored = np.clip(np.rint(hu) + 1024, 0, 4095).astype(np.uint16)
        ds.Rows, ds.Columns = stored.shape
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelRepresentation = 1, "MONOCHROME2", 0
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelData = stored.tobytes()
    if spacing is not None:
        ds.PixelSpacing = list(spacing)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def phantom_dicom(label: str = "Tumor", size: int = 96, spacing: tuple[float, float] | None = (0.8, 0.8),
                  pixels: bool = True) -> bytes:
    """A phantom slice as a CT DICOM file."""
    from tumorscope.data.phantom import image_rng, render_slice_hu

    hu = render_slice_hu(image_rng(5, label, 1), label, size, 12.0, 0.7).hu if pixels else None
    return dicom_bytes(hu, spacing)


def not_ct_images(size: int = 96) -> dict[str, np.ndarray]:
    """Images no radiologist would send: blank white/black, constant grey, pure noise, a smooth
    colour gradient (a photograph's sky) and a page of text. Each must be referred, with a reason."""
    from PIL import ImageDraw

    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, size)
    gradient = np.stack([np.add.outer(ramp, ramp) / 2, np.tile(ramp, (size, 1)), np.tile(ramp[:, None], (1, size))[::-1]],
                        axis=-1)
    page = Image.new("L", (size, size), 255)
    draw = ImageDraw.Draw(page)
    for row in range(0, size, 12):
        draw.text((4, row), "Patient report: no findings.", fill=0)
    return {"white.png": np.full((size, size), 255), "black.png": np.zeros((size, size)),
            "grey.png": np.full((size, size), 120), "noise.png": rng.integers(0, 256, (size, size)),
            "gradient.png": gradient, "text.png": np.asarray(page)}


def another_export(raw_dir, out_dir, renamed_every: int = 3) -> dict[str, int]:
    """The fixture slices as a processed export (CLAHE, 224 px, JPEG), every ``renamed_every``-th
    under another name (tied by pHash, not by name), and one slice of nobody (untied)."""
    from PIL import Image
    from skimage import exposure

    counts = {"same_name": 0, "renamed": 0}
    for i, path in enumerate(sorted(p for p in raw_dir.glob("*/*.jpg") if not p.parent.name.startswith("_"))):
        pixels = np.asarray(Image.open(path).convert("L").resize((224, 224), Image.LANCZOS))
        processed = (exposure.equalize_adapthist(pixels, clip_limit=0.02) * 255).astype(np.uint8)
        renamed = i % renamed_every == 0
        target = out_dir / path.parent.name / (f"export-{i}.jpg" if renamed else path.name)
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(processed).save(target, quality=90)
        counts["renamed" if renamed else "same_name"] += 1
    nobody = np.random.default_rng(0).integers(0, 255, (224, 224), dtype=np.uint8)
    Image.fromarray(nobody).save(out_dir / "Tumor" / "nobody.jpg")
    return counts
