"""Per-slice features that drift monitoring compares: intensity, contrast, sharpness, noise,
size and bit depth of the slice, and the model's answer (class, confidence, embedding).

Intensity features are measured on the model input (the slice decoded and prepared exactly as the
training cache did), so a reference from the cache and a current window from uploads compare like
with like. Size and bit depth describe the file as it arrived. Pure numpy: the service computes
them once per request and writes them into the inference log, so monitoring never reads an image
again.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

# Columns Evidently compares, by kind. Embedding columns are emb_0 .. emb_<dims-1>.
IMAGE_FEATURES = ("mean", "std", "p1", "p50", "p99", "contrast", "sharpness", "noise", "height", "width", "bit_depth")
PREDICTION_FEATURES = ("predicted_class", "confidence")
# Per slice, 1.0/0.0 (NaN where unknown): referred to a radiologist; referred as unlike the training slices.
TRUST_COLUMNS = ("refer", "ood")
EMBEDDING_PREFIX = "emb_"

# The random projection that summarises the penultimate layer (the service logs it per request).
EMBEDDING_SEED = 20261125

# Bits per sample of a decoded source, by Pillow mode; a DICOM's stored values (12-16 bits in CT)
# count as 16.
_BIT_DEPTHS = {"1": 1, "L": 8, "P": 8, "LA": 8, "RGB": 8, "RGBA": 8, "CMYK": 8, "YCbCr": 8,
               "I": 32, "F": 32, "DICOM": 16}


def bit_depth(source_mode: str) -> int:
    if source_mode.startswith("I;16"):
        return 16
    return _BIT_DEPTHS.get(source_mode, 8)


def embedding_columns(dims: int) -> list[str]:
    return [f"{EMBEDDING_PREFIX}{i}" for i in range(dims)]


def pixel_features(images: np.ndarray, chunk: int = 512) -> dict[str, np.ndarray]:
    """Intensity features of (N, H, W) or (N, H, W, 1) uint8 model inputs, each an (N,) array.

    sharpness: variance of the 4-neighbour Laplacian (falls with blur, rises with noise);
    noise: Immerkaer's (1996) estimate of the noise standard deviation, the mean absolute response
    of a mask that cancels locally linear structure, so edges and smooth anatomy contribute little.
    """
    images = np.asarray(images)
    n = len(images)
    if images.ndim == 4:
        images = images[..., 0]
    if images.ndim != 3:
        raise ValueError(f"expected (N, H, W[, 1]) images, got shape {images.shape}")
    height, width = images.shape[1:]
    if height < 3 or width < 3:
        raise ValueError(f"images of {height}x{width} pixels are too small for sharpness and noise")
    out: dict[str, np.ndarray] = {name: np.empty(n, dtype=np.float64) for name in ("mean", "std", "p1", "p50", "p99", "sharpness", "noise")}
    for start in range(0, n, chunk):  # bounded memory for a large reference
        x = np.asarray(images[start:start + chunk], dtype=np.float32)
        part = slice(start, start + len(x))
        out["mean"][part] = x.mean(axis=(1, 2))
        out["std"][part] = x.std(axis=(1, 2))
        p1, p50, p99 = np.percentile(x.reshape(len(x), -1), [1, 50, 99], axis=1)
        out["p1"][part], out["p50"][part], out["p99"][part] = p1, p50, p99
        centre = x[:, 1:-1, 1:-1]
        laplacian = x[:, :-2, 1:-1] + x[:, 2:, 1:-1] + x[:, 1:-1, :-2] + x[:, 1:-1, 2:] - 4 * centre
        out["sharpness"][part] = laplacian.var(axis=(1, 2))
        corners = x[:, :-2, :-2] + x[:, :-2, 2:] + x[:, 2:, :-2] + x[:, 2:, 2:]
        edges = x[:, :-2, 1:-1] + x[:, 2:, 1:-1] + x[:, 1:-1, :-2] + x[:, 1:-1, 2:]
        response = np.abs(corners - 2 * edges + 4 * centre).sum(axis=(1, 2))
        out["noise"][part] = math.sqrt(math.pi / 2) * response / (6 * (width - 2) * (height - 2))
    out["contrast"] = out["p99"] - out["p1"]
    return out


def image_features(pixels: np.ndarray, original_shape: tuple[int, int], source_mode: str) -> dict[str, float]:
    """The image features of one prepared slice ((H, W) or (H, W, 1) uint8) as plain floats."""
    one = {name: float(values[0]) for name, values in pixel_features(np.asarray(pixels)[np.newaxis]).items()}
    return one | {"height": float(original_shape[0]), "width": float(original_shape[1]),
                  "bit_depth": float(bit_depth(source_mode))}


def prediction_frame(probabilities: np.ndarray, classes: list[str], embeddings: np.ndarray) -> pd.DataFrame:
    """predicted_class, confidence and emb_* columns of a batch of model answers."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    embeddings = np.asarray(embeddings, dtype=np.float64).reshape(len(probabilities), -1)
    frame = pd.DataFrame({"predicted_class": np.asarray(classes, dtype=object)[probabilities.argmax(axis=1)],
                          "confidence": probabilities.max(axis=1)})
    return pd.concat([frame, pd.DataFrame(embeddings, columns=embedding_columns(embeddings.shape[1]))], axis=1)


def feature_frame(images: np.ndarray, original_shapes: np.ndarray, source_modes: list[str], probabilities: np.ndarray,
                  classes: list[str], embeddings: np.ndarray, judged: Any = None) -> pd.DataFrame:
    """The monitoring table of a batch of prepared slices and the model's answers on them
    (``probabilities`` the network's own); with ``judged`` (``trust.answers.Judged``) the
    ``TRUST_COLUMNS`` too, NaN without."""
    pixels = pixel_features(images)
    shapes = np.asarray(original_shapes, dtype=np.float64).reshape(len(images), 2)
    frame = pd.DataFrame(pixels | {"height": shapes[:, 0], "width": shapes[:, 1],
                                   "bit_depth": [float(bit_depth(m)) for m in source_modes]})
    trust = pd.DataFrame({"refer": judged.refer.astype(np.float64), "ood": judged.ood.astype(np.float64)}
                         if judged is not None else {name: np.full(len(images), np.nan) for name in TRUST_COLUMNS})
    return pd.concat([frame[list(IMAGE_FEATURES)], prediction_frame(probabilities, classes, embeddings), trust], axis=1)


def embedding_projection(width: int, dims: int, seed: int = EMBEDDING_SEED) -> np.ndarray:
    """A fixed (width, dims) Gaussian random projection scaled by 1/sqrt(dims).

    Random projection roughly keeps distances between feature vectors (Johnson-Lindenstrauss), which
    is what a drift check on embeddings compares; unlike PCA it needs no fitted state, and unlike
    keeping the first ``dims`` units it sees every unit. Same width and seed, same matrix."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, width, dims]))
    return (rng.standard_normal((width, dims)) / math.sqrt(dims)).astype(np.float32)


def summarize_embedding(features: np.ndarray, dims: int) -> np.ndarray:
    """(N, width) penultimate-layer features -> (N, dims) by ``embedding_projection``."""
    features = np.asarray(features, dtype=np.float32).reshape(len(features), -1)
    return features @ embedding_projection(features.shape[1], dims)


def feature_model(model: Any) -> Any:
    """A model with the classifier's two outputs of one forward pass: its probabilities and the
    input of its final layer (the penultimate Dense layer's output in inference mode: for the
    small CNN the Dense head, for the Applications the head after its dropout, an identity)."""
    import keras

    last = model.layers[-1]
    try:
        penultimate = last.input
    except (AttributeError, ValueError) as err:
        raise ValueError(f"cannot find the input of the final layer {last.name!r}: {err}") from None
    return keras.Model(model.inputs, [model.outputs[0], penultimate], name=f"{model.name}_with_features")


def model_outputs(model, images: np.ndarray, embedding_dims: int, batch_size: int = 256,
                  with_features: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities, embedding summaries) of (N, S, S, 1) uint8 images: one forward pass per
    batch through the classifier with its penultimate features (the service's computation).
    Pass ``with_features`` (``feature_model(model)``) when calling again with the same model: building
    it and tracing its first call cost more than a single image's forward pass."""
    with_features = with_features if with_features is not None else feature_model(model)
    probabilities, embeddings = [], []
    for start in range(0, len(images), batch_size):
        outputs = with_features.predict_on_batch(np.asarray(images[start:start + batch_size], dtype=np.uint8))
        probabilities.append(np.asarray(outputs[0], dtype=np.float64))
        embeddings.append(summarize_embedding(np.asarray(outputs[1]), embedding_dims))
    if not probabilities:
        return np.zeros((0, model.outputs[0].shape[-1])), np.zeros((0, embedding_dims))
    return np.concatenate(probabilities), np.concatenate(embeddings)
