"""Per-image out-of-distribution checks: is this slice like the ones the model learnt from?

Two independent looks, each fitted on training data and thresholded on validation data:
- **Input** on the prepared pixels (``monitoring.features.pixel_features``): a blank or constant
  slice, or intensity and texture statistics (mean, spread, median, 99th percentile, contrast,
  sharpness, noise) whose joint Mahalanobis distance to the training slices' exceeds a validation
  quantile: a different scanner, window or kind of image shows here first, whatever the network
  makes of it. The reason names the most unusual statistic.
- **Feature space**: the Mahalanobis distance of the slice's penultimate-layer embedding (its fixed
  random projection, ``monitoring.features.summarize_embedding``) to the nearest class mean of the
  training embeddings, with one shared covariance (Lee et al. 2018, "A simple unified framework for
  detecting out-of-distribution samples"). Unlike a nearest-neighbour search it needs no bank of
  training embeddings: a few kilobytes in the model's metadata. The threshold is the ``quantile``
  of the same distance over validation slices (group-weighted), so about 1 - quantile of
  in-distribution slices is referred.
"""

from __future__ import annotations

import numpy as np

from tumorscope.trust.calibration import group_weights
from tumorscope.trust.conformal import weighted_quantile

# A slice whose grey levels spread less than this is blank or constant: no anatomy to classify.
MIN_INTENSITY_STD = 2.0
# The per-slice statistics of the input check (``monitoring.features.pixel_features``), as
# log(1 + value): sharpness and noise have heavy tails that would dominate a Gaussian otherwise.
INTENSITY_FEATURES = ("mean", "std", "p50", "p99", "contrast", "sharpness", "noise")


def intensity_vectors(features: dict[str, np.ndarray]) -> np.ndarray:
    """(N, F) log(1 + statistic) of each slice, in ``INTENSITY_FEATURES`` order."""
    return np.log1p(np.stack([np.maximum(np.asarray(features[name], dtype=np.float64), 0.0)
                              for name in INTENSITY_FEATURES], axis=1))


def fit_intensity_density(features: dict[str, np.ndarray]) -> dict:
    """One Gaussian over the training slices' intensity vectors (shrunk covariance), and each
    statistic's spread, to name the most unusual one in a reason."""
    vectors = intensity_vectors(features)
    density = fit_feature_density(vectors, np.zeros(len(vectors), dtype=np.int64), n_classes=1)
    return density | {"names": list(INTENSITY_FEATURES), "scale": np.maximum(vectors.std(axis=0), 1e-6).tolist()}


def input_reason(features: dict[str, float], density: dict, distance: float, threshold: float) -> str | None:
    """Why a slice's pixels alone make its answer untrustworthy, or None: blank or constant, or
    intensity and texture statistics jointly unlike the training slices' (the distance from
    ``mahalanobis_distance(intensity_vectors(...), density)`` beyond ``threshold``)."""
    if features["std"] < MIN_INTENSITY_STD:
        return f"blank or constant image (grey levels spread {features['std']:.1f})"
    if distance > threshold:
        vector = intensity_vectors({name: np.array([features[name]]) for name in INTENSITY_FEATURES})[0]
        z = (vector - np.asarray(density["means"][0])) / np.asarray(density["scale"])
        worst = INTENSITY_FEATURES[int(np.argmax(np.abs(z)))]
        return (f"intensity and texture unlike the training slices (distance {distance:.1f} > {threshold:.1f}; "
                f"most unusual: {worst} {features[worst]:.1f})")
    return None


def fit_feature_density(embeddings: np.ndarray, labels: np.ndarray, n_classes: int) -> dict:
    """Class means and one shared precision matrix of training embeddings (Lee et al. 2018), the
    covariance shrunk by Ledoit-Wolf so that a few hundred slices give a stable inverse. Small
    enough (K x d means, d x d precision) to travel in the model's metadata."""
    from sklearn.covariance import LedoitWolf

    embeddings = np.asarray(embeddings, dtype=np.float64).reshape(len(embeddings), -1)
    labels = np.asarray(labels, dtype=np.int64)
    means: list[list[float] | None] = []
    centred = []
    for k in range(n_classes):
        members = embeddings[labels == k]
        if len(members) == 0:  # a class absent from training has no region to be near
            means.append(None)
            continue
        mean = members.mean(axis=0)
        means.append(mean.tolist())
        centred.append(members - mean)
    if not centred:
        raise ValueError("no training embeddings to fit the feature-space check on")
    precision = LedoitWolf(assume_centered=True).fit(np.concatenate(centred)).precision_
    return {"means": means, "precision": precision.tolist()}


def mahalanobis_distance(embeddings: np.ndarray, density: dict) -> np.ndarray:
    """Each embedding's Mahalanobis distance to the nearest class mean of the training data."""
    embeddings = np.asarray(embeddings, dtype=np.float64).reshape(len(embeddings), -1)
    precision = np.asarray(density["precision"], dtype=np.float64)
    nearest = np.full(len(embeddings), np.inf)
    for mean in density["means"]:
        if mean is None:
            continue
        offset = embeddings - np.asarray(mean, dtype=np.float64)
        nearest = np.minimum(nearest, np.einsum("ij,jk,ik->i", offset, precision, offset))
    return np.sqrt(np.clip(nearest, 0.0, None))


def distance_threshold(validation_distances: np.ndarray, validation_groups: np.ndarray, quantile: float) -> float:
    """The feature-space threshold: the group-weighted ``quantile`` of validation distances."""
    return weighted_quantile(validation_distances, group_weights(validation_groups), quantile)
