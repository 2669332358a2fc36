"""Preprocess readable slices into a uint8 array cache that training memory-maps.

Decoding JPEGs every epoch costs more than a small CNN's step on CPU; the cache is decoded once.
Enhancements (CLAHE, histogram equalisation, denoising) are optional and their effect is measured
against the plain resized image with SSIM and PSNR, as the public seed notebooks reported.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from tumorscope.config import PreprocessConfig, WindowConfig
from tumorscope.data.images import read_greyscale
from tumorscope.data.split import SPLITS
from tumorscope.progress import progress


def resize(pixels: np.ndarray, size: int) -> np.ndarray:
    """Square resize of a uint8 greyscale slice (area-averaging when shrinking)."""
    from PIL import Image

    if pixels.shape == (size, size):
        return pixels
    image = Image.fromarray(pixels)
    return np.asarray(image.resize((size, size), Image.Resampling.BOX if min(pixels.shape) > size else Image.Resampling.BILINEAR))


# Grey level (of 255) above which a pixel is body rather than air, and the opening that cuts the
# thin CT table and cables off the body before its bounding box is taken.
BODY_THRESHOLD = 20
BODY_OPENING_PX = 5


def crop_to_body(pixels: np.ndarray) -> np.ndarray:
    """The square around the largest bright connected region (the patient's body), padded with 0,
    so the kidneys get more of the model's pixels than air, table and border. A slice with no such
    region is returned as it is."""
    from scipy import ndimage

    body = ndimage.binary_opening(pixels > BODY_THRESHOLD, iterations=BODY_OPENING_PX)
    labelled, n = ndimage.label(body)
    if n == 0:
        return pixels
    sizes = np.bincount(labelled.ravel())[1:]
    rows, cols = np.nonzero(labelled == int(np.argmax(sizes)) + 1)
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    side = max(bottom - top, right - left)
    square = np.zeros((side, side), dtype=pixels.dtype)
    r0, c0 = (side - (bottom - top)) // 2, (side - (right - left)) // 2
    square[r0:r0 + bottom - top, c0:c0 + right - left] = pixels[top:bottom, left:right]
    return square


def field_of_view(pixels: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """The part of a decoded slice the model sees: the body's square (``body_crop``) or all of it."""
    return crop_to_body(pixels) if cfg.body_crop else pixels


def stretch_percentiles(pixels: np.ndarray, low: float = 1.0, high: float = 99.0) -> np.ndarray:
    """Per-image intensity normalisation: the ``low`` to ``high`` percentile range stretched to
    0-255 (clipped), against differences in window, contrast and export between series. A slice
    without spread is returned as it is."""
    lo, hi = np.percentile(pixels, [low, high])
    if hi - lo < 1.0:
        return pixels
    stretched = (pixels.astype(np.float64) - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(stretched), 0, 255).astype(np.uint8)


def enhance(pixels: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """Optional denoise, CLAHE, histogram equalisation and percentile normalisation, in that
    order; uint8 in, uint8 out."""
    if cfg.denoise or cfg.clahe or cfg.equalize:
        from skimage import exposure, restoration

        image = pixels.astype(np.float64) / 255.0
        if cfg.denoise:
            image = restoration.denoise_tv_chambolle(image, weight=cfg.denoise_weight)
        if cfg.clahe:
            image = exposure.equalize_adapthist(image, clip_limit=cfg.clahe_clip_limit)
        if cfg.equalize:
            image = exposure.equalize_hist(image)
        pixels = np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
    return stretch_percentiles(pixels) if cfg.normalize == "percentile" else pixels


def model_input(view: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """A field of view (``field_of_view``) resized and enhanced: the model's input."""
    return enhance(resize(view, cfg.image_size), cfg)


def prepare_slice(pixels: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """The one transform from a decoded slice to model input; serving calls it too."""
    return model_input(field_of_view(pixels, cfg), cfg)


def quality(original: np.ndarray, processed: np.ndarray) -> tuple[float, float]:
    """(SSIM, PSNR in dB) of the processed slice against the plain resized one."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    ssim = float(structural_similarity(original, processed, data_range=255))
    if np.array_equal(original, processed):
        return ssim, float("inf")
    return ssim, float(peak_signal_noise_ratio(original, processed, data_range=255))


def cache_paths(cache_dir: Path, split: str) -> tuple[Path, Path]:
    return cache_dir / f"{split}_x.npy", cache_dir / f"{split}_y.npy"


def build_cache(split_table: pd.DataFrame, classes: list[str], cfg: PreprocessConfig,
                window: WindowConfig, quality_sample: int = 64) -> dict:
    """Write <split>_x.npy (N,H,W,1 uint8), <split>_y.npy (N int32), classes.json; return a report."""
    cache_dir = Path(cfg.cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    class_index = {c: i for i, c in enumerate(classes)}
    ssims: list[float] = []
    psnrs: list[float] = []
    counts = {}
    for split in SPLITS:
        rows = split_table[split_table["split"] == split]
        x_path, y_path = cache_paths(cache_dir, split)
        # Written through a memory map so peak RAM stays one slice, whatever the data set size.
        images = np.lib.format.open_memmap(x_path, mode="w+", dtype=np.uint8,
                                           shape=(len(rows), cfg.image_size, cfg.image_size, 1))
        for i, path in enumerate(progress(rows["path"], len(rows), f"cache {split}")):
            pixels, _ = read_greyscale(path, window)
            plain = resize(field_of_view(pixels, cfg), cfg.image_size)
            processed = enhance(plain, cfg)
            images[i, :, :, 0] = processed
            if len(ssims) < quality_sample:
                ssim, psnr = quality(plain, processed)
                ssims.append(ssim)
                psnrs.append(psnr)
        images.flush()
        del images
        np.save(y_path, rows["label"].map(class_index).to_numpy(dtype=np.int32))
        # Duplicate-group ids travel with the cache: intervals resample whole groups.
        np.save(cache_dir / f"{split}_groups.npy", rows["group"].to_numpy(dtype=np.int64))
        counts[split] = int(len(rows))
    (cache_dir / "classes.json").write_text(json.dumps(classes))
    finite_psnr = [p for p in psnrs if np.isfinite(p)]
    return {
        "image_size": cfg.image_size,
        "enhancements": {"clahe": cfg.clahe, "equalize": cfg.equalize, "denoise": cfg.denoise,
                         "body_crop": cfg.body_crop, "normalize": cfg.normalize},
        "counts": counts,
        "quality_vs_plain_resize": {
            "n_sampled": len(ssims),
            "ssim_mean": float(np.mean(ssims)) if ssims else None,
            # PSNR is infinite when no enhancement changes a pixel; reported as null then.
            "psnr_mean_db": float(np.mean(finite_psnr)) if finite_psnr else None,
        },
    }


def load_split(cache_dir: str | Path, split: str, mmap: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) of one split; images memory-mapped read-only by default."""
    x_path, y_path = cache_paths(Path(cache_dir), split)
    return np.load(x_path, mmap_mode="r" if mmap else None), np.load(y_path)


def load_groups(cache_dir: str | Path, split: str) -> np.ndarray:
    """Duplicate-group id of every cached image of one split (same order as load_split)."""
    path = Path(cache_dir) / f"{split}_groups.npy"
    if not path.is_file():
        from tumorscope.errors import UserError

        raise UserError(f"{path} not found (a cache from an older version?): rebuild it with tumorscope preprocess")
    return np.load(path)


def load_classes(cache_dir: str | Path) -> list[str]:
    return json.loads((Path(cache_dir) / "classes.json").read_text())


def load_cached_dataset(cache_dir: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every cached image of every split, in memory: (images, labels, duplicate-group ids)."""
    parts = [load_split(cache_dir, split, mmap=False) for split in SPLITS]
    return (np.concatenate([images for images, _ in parts]), np.concatenate([labels for _, labels in parts]),
            np.concatenate([load_groups(cache_dir, split) for split in SPLITS]))
