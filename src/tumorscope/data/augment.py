"""Random geometric and intensity augmentation of uint8 slice batches on the host, for the training loader.

The transforms are those of the in-model Keras layers (`tumorscope.models.zoo.augmentation`):
a left/right flip, a rotation of up to ``strength`` * 180 degrees, a translation of up to
``strength`` / 2 of each side and a zoom by a factor in [1 - strength, 1 + strength], empty
borders filled with 0. Here they are composed into one affine warp per image and applied with
`scipy.ndimage` before the batch reaches the model, which is why this module exists: on the JAX
backend each Keras affine layer resamples the batch separately and slowly (docs/benchmarks.md),
and a loader-side transform gives the same pixels on every backend for the same seed.
"""

from __future__ import annotations

import numpy as np


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


def augment_batch(images: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """A randomly flipped, rotated, zoomed and shifted copy of a (n, size, size, 1) uint8 batch
    (bilinear, borders 0); ``strength`` 0 returns the batch unchanged."""
    if strength <= 0 or len(images) == 0:
        return images
    from scipy import ndimage

    matrices, offsets = random_affines(rng, len(images), strength, images.shape[1])
    # "grid-constant" blends edge pixels with the 0 fill, as Keras' constant fill does; scipy's
    # "constant" zeroes any point a hair outside the slice (a black line at the border).
    out = np.empty_like(images)
    for index, (matrix, offset) in enumerate(zip(matrices, offsets, strict=True)):
        warped = ndimage.affine_transform(images[index, :, :, 0].astype(np.float32), matrix, offset,
                                          order=1, mode="grid-constant", cval=0.0)
        out[index, :, :, 0] = np.clip(np.rint(warped), 0, 255)
    return out


def augment_intensity(images: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Per image, the kind of change another scanner or export makes (what ``tumorscope incoming``
    simulates): a window change (contrast x [1 - s, 1 + s] about mid-grey, brightness +- s * 64), a
    gamma in [1 - s, 1 + s] and Gaussian noise of standard deviation up to s * 20 grey levels, for
    strength s; uint8 in and out. ``strength`` 0 returns the batch unchanged."""
    if strength <= 0 or len(images) == 0:
        return images
    n = len(images)
    contrast = rng.uniform(1.0 - strength, 1.0 + strength, (n, 1, 1, 1))
    brightness = rng.uniform(-strength, strength, (n, 1, 1, 1)) * 64.0
    gamma = rng.uniform(1.0 - strength, 1.0 + strength, (n, 1, 1, 1))
    noise = rng.uniform(0.0, strength * 20.0, (n, 1, 1, 1)) * rng.standard_normal(images.shape)
    x = (images.astype(np.float32) - 127.5) * contrast + 127.5 + brightness
    x = 255.0 * (np.clip(x, 0.0, 255.0) / 255.0) ** gamma + noise
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)
