"""Random geometric and intensity augmentation of uint8 slice batches on the host, for the training loader.

The transforms are those of the in-model Keras layers (`tumorscope.models.zoo.augmentation`):
a left/right flip, a rotation of up to ``strength`` * 180 degrees, a translation of up to
``strength`` / 2 of each side and a zoom by a factor in [1 - strength, 1 + strength], empty
borders filled with 0. Here they are composed into one affine warp per image and applied with
`scipy.ndimage` before the batch reaches the model, which is why this module exists: on the JAX
backend each Keras affine layer resamples the batch separately and slowly (docs/benchmarks.md),
and a loader-side transform gives the same pixels on every backend for the same seed.

Every random draw of a batch is made first, in the calling thread, in one order; only the
arithmetic is then spread over ``workers`` threads: `scipy.ndimage` and NumPy
release the GIL while they compute, so threads warp images in parallel on several cores, and the
pixels are the same whatever the number of threads.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def loader_threads(requested: int) -> int:
    """train.loader_workers resolved: 0 means one thread per usable CPU core (at most 8)."""
    return requested or min(8, usable_cores())


@functools.cache
def _thread_pool(workers: int) -> ThreadPoolExecutor:
    # One pool per size for the process's life: a loader asks for one per batch.
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tumorscope-augment")


def _in_chunks(n: int, work: Callable[[slice], None], workers: int) -> None:
    """Run ``work`` over ``range(n)`` split into ``workers`` contiguous slices at once (in this
    thread when ``workers`` is 1). Each call writes its own slice of a shared output."""
    if workers <= 1 or n < 2:
        work(slice(0, n))
        return
    bounds = np.linspace(0, n, min(n, workers) + 1).astype(int)
    pool = _thread_pool(workers)
    for future in [pool.submit(work, slice(a, b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]:
        future.result()


def random_affines(rng: np.random.Generator, n: int, strength: float, size: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` random (matrix, offset) pairs in the convention of `scipy.ndimage.affine_transform`
    (input coordinate = matrix @ output coordinate + offset, coordinates (row, column)), each a
    flip, rotation, zoom and translation about the centre of a ``size`` x ``size`` slice."""
    angles = rng.uniform(-np.pi * strength, np.pi * strength, n)
    zooms = rng.uniform(1.0 - strength, 1.0 + strength, n)
    shifts = rng.uniform(-strength / 2.0, strength / 2.0, (n, 2)) * size
    flips = np.where(rng.random(n) < 0.5, -1.0, 1.0)
    cos, sin = np.cos(angles), np.sin(angles)
    # rotation @ zoom @ column flip, one 2x2 matrix per image
    matrices = np.stack([np.stack([cos, -sin * flips], axis=-1), np.stack([sin, cos * flips], axis=-1)], axis=1)
    matrices *= zooms[:, None, None]
    centre = np.full(2, (size - 1) / 2.0)
    offsets = centre - matrices @ centre - shifts
    return matrices, offsets


def augment_batch(images: np.ndarray, strength: float, rng: np.random.Generator, workers: int = 1) -> np.ndarray:
    """A randomly flipped, rotated, zoomed and shifted copy of a (n, size, size, 1) uint8 batch
    (bilinear, borders 0); ``strength`` 0 returns the batch unchanged. ``workers``: threads that
    warp parts of the batch at once (the same pixels for any number)."""
    if strength <= 0 or len(images) == 0:
        return images
    from scipy import ndimage

    matrices, offsets = random_affines(rng, len(images), strength, images.shape[1])
    # "grid-constant" blends edge pixels with the 0 fill, as Keras' constant fill does; scipy's
    # "constant" zeroes any point a hair outside the slice (a black line at the border).
    out = np.empty_like(images)

    def warp(part: slice) -> None:
        for index in range(part.start, part.stop):
            warped = ndimage.affine_transform(images[index, :, :, 0].astype(np.float32), matrices[index],
                                              offsets[index], order=1, mode="grid-constant", cval=0.0)
            out[index, :, :, 0] = np.clip(np.rint(warped), 0, 255)

    _in_chunks(len(images), warp, workers)
    return out


def augment_intensity(images: np.ndarray, strength: float, rng: np.random.Generator,
                      workers: int = 1) -> np.ndarray:
    """Per image, the kind of change another scanner or export makes (what ``tumorscope incoming``
    simulates): a window change (contrast x [1 - s, 1 + s] about mid-grey, brightness +- s * 64), a
    gamma in [1 - s, 1 + s] and Gaussian noise of standard deviation up to s * 20 grey levels, for
    strength s; uint8 in and out. ``strength`` 0 returns the batch unchanged; ``workers`` as for
    `augment_batch`."""
    if strength <= 0 or len(images) == 0:
        return images
    n = len(images)
    contrast = rng.uniform(1.0 - strength, 1.0 + strength, (n, 1, 1, 1))
    brightness = rng.uniform(-strength, strength, (n, 1, 1, 1)) * 64.0
    gamma = rng.uniform(1.0 - strength, 1.0 + strength, (n, 1, 1, 1))
    noise_sd = rng.uniform(0.0, strength * 20.0, n)
    # The noise, the costly draw, comes from one child generator per image: drawn in the threads,
    # the same whichever thread draws it.
    noise_rngs = rng.spawn(n)
    out = np.empty_like(images, dtype=np.uint8)

    def change(part: slice) -> None:
        x = (images[part].astype(np.float32) - 127.5) * contrast[part] + 127.5 + brightness[part]
        noise = np.stack([noise_rngs[i].standard_normal(images.shape[1:]) for i in range(part.start, part.stop)])
        x = 255.0 * (np.clip(x, 0.0, 255.0) / 255.0) ** gamma[part] + noise_sd[part, None, None, None] * noise
        out[part] = np.clip(np.rint(x), 0, 255)

    _in_chunks(n, change, workers)
    return out


# Ranges of export randomisation, each drawn uniformly per slice: what separates one hospital's
# export of a CT slice from another's (kidney-ct-large is CLAHE-processed; others are raw windows,
# sharpened, JPEG-compressed or resampled). CLAHE's clip limit is OpenCV's 1-6 in scikit-image's
# units (relative to a 256-bin histogram) and its tiles 4-16 per side.
EXPORT_RANGES = {"clahe_clip": (1.0 / 256, 6.0 / 256), "clahe_tiles": (4, 16), "unsharp_radius": (0.5, 2.0),
                 "unsharp_amount": (0.5, 2.0), "blur_sigma": (0.4, 1.5), "gamma": (0.7, 1.5),
                 "contrast": (0.7, 1.3), "brightness": (-30.0, 30.0), "jpeg_quality": (50, 95),
                 "resize": (0.4, 0.9)}
EXPORT_TRANSFORMS = ("resize", "blur", "unsharp", "clahe", "window", "gamma", "jpeg")


def export_draws(rng: np.random.Generator, n: int, probability: float) -> list[dict]:
    """Per slice, which transforms apply (each with ``probability``) and their parameters: drawn here,
    in one order, so the pixels do not depend on the threads that apply them."""
    r = EXPORT_RANGES
    on = rng.random((n, len(EXPORT_TRANSFORMS))) < probability
    values = {name: rng.uniform(low, high, n) for name, (low, high) in r.items()}
    draws = []
    for i in range(n):
        chosen = {name: bool(on[i, k]) for k, name in enumerate(EXPORT_TRANSFORMS)}
        draws.append({"on": chosen} | {name: float(v[i]) for name, v in values.items()})
    return draws


def export_variant(image: np.ndarray, draw: dict) -> np.ndarray:
    """One uint8 (H, W) slice as another export might have written it (``export_draws``' draw)."""
    import io

    from PIL import Image
    from scipy import ndimage
    from skimage import exposure, filters

    on, size = draw["on"], image.shape
    x = image.astype(np.float32) / 255.0
    if on["resize"]:
        small = max(8, round(size[0] * draw["resize"])), max(8, round(size[1] * draw["resize"]))
        bilinear = Image.Resampling.BILINEAR
        picture = Image.fromarray(image).resize(small[::-1], bilinear).resize(size[::-1], bilinear)
        x = np.asarray(picture, dtype=np.float32) / 255.0
    if on["blur"]:
        x = ndimage.gaussian_filter(x, draw["blur_sigma"])
    if on["unsharp"]:
        x = filters.unsharp_mask(x, radius=draw["unsharp_radius"], amount=draw["unsharp_amount"])
    if on["clahe"]:
        tiles = int(round(draw["clahe_tiles"]))
        x = exposure.equalize_adapthist(np.clip(x, 0.0, 1.0), kernel_size=max(2, size[0] // tiles),
                                        clip_limit=draw["clahe_clip"])
    if on["window"]:
        x = (x - 0.5) * draw["contrast"] + 0.5 + draw["brightness"] / 255.0
    if on["gamma"]:
        x = np.clip(x, 0.0, 1.0) ** draw["gamma"]
    out = np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)
    if on["jpeg"]:
        buffer = io.BytesIO()
        Image.fromarray(out).save(buffer, format="JPEG", quality=int(round(draw["jpeg_quality"])))
        out = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("L"), dtype=np.uint8)
    return out


def randomise_export(images: np.ndarray, probability: float, rng: np.random.Generator,
                     workers: int = 1) -> np.ndarray:
    """Export randomisation of a uint8 batch (N, H, W, 1): each transform of ``EXPORT_TRANSFORMS``
    applied to each slice with ``probability`` (0 returns the batch unchanged), so that a model
    cannot use an export's texture (CLAHE, sharpening, compression, resampling) as a cue."""
    if probability <= 0 or len(images) == 0:
        return images
    draws = export_draws(rng, len(images), probability)
    out = np.empty_like(images, dtype=np.uint8)

    def change(part: slice) -> None:
        for i in range(part.start, part.stop):
            out[i, ..., 0] = export_variant(images[i, ..., 0], draws[i])

    _in_chunks(len(images), change, workers)
    return out
