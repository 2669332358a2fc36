"""Per-image out-of-distribution checks: is this slice like the ones the model learnt from?

Two independent looks, each fitted on training data and thresholded on validation data:
- **Input sanity** on the prepared pixels (``monitoring.features.pixel_features``): a blank or
  constant slice, or an intensity statistic (mean, spread, percentiles, noise) outside the range
  the training slices span, widened by a margin. Cheap, and it explains itself in grey levels.
- **Feature space**: the Mahalanobis distance of the slice's penultimate-layer embedding (its fixed
  random projection, ``monitoring.features.summarize_embedding``) to the nearest class mean of the
  training embeddings, with one shared covariance (Lee et al. 2018, "A simple unified framework for
  detecting out-of-distribution samples"). Unlike a nearest-neighbour search it needs no bank of
  training embeddings: a few kilobytes in the model's metadata. The threshold is the ``quantile``
  of the same distance over validation slices (group-weighted), so about 1 - quantile of
  in-distribution slices is referred.
"""

from __future__ import annotations

import math

import numpy as np

from tumorscope.trust.calibration import group_weights

# A slice whose grey levels spread less than this is blank or constant: no anatomy to classify.
MIN_INTENSITY_STD = 2.0
SANITY_FEATURES = ("mean", "std", "p1", "p50", "p99", "noise")


def fit_envelope(features: dict[str, np.ndarray], tail: float, margin: float) -> dict[str, list[float]]:
    """Per feature, [low, high]: the tail and 1 - tail quantiles over training slices, each widened
    by ``margin`` times the distance between them (a feature no slice varies in gets +-1 grey level)."""
    envelope = {}
    for name in SANITY_FEATURES:
        low, high = np.quantile(np.asarray(features[name], dtype=np.float64), [tail, 1.0 - tail])
        widen = max(margin * (high - low), 1.0)
        envelope[name] = [float(low - widen), float(high + widen)]
    return envelope


def input_reason(features: dict[str, float], envelope: dict[str, list[float]]) -> str | None:
    """Why a slice's pixels alone make its answer untrustworthy, or None."""
    if features["std"] < MIN_INTENSITY_STD:
        return f"blank or constant image (grey levels spread {features['std']:.1f}, training slices at least {envelope['std'][0]:.1f})"
    for name in SANITY_FEATURES:
        low, high = envelope[name]
        if not low <= features[name] <= high:
            return f"intensity unlike the training slices ({name} {features[name]:.1f} outside [{low:.1f}, {high:.1f}])"
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


def weighted_quantile(values: np.ndarray, weights: np.ndarray, quantile: float) -> float:
    """The smallest value whose weighted cumulative share reaches ``quantile``."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return math.inf
    order = np.argsort(values, kind="stable")
    share = np.cumsum(np.asarray(weights, dtype=np.float64)[order])
    share /= share[-1]
    return float(values[order][min(int(np.searchsorted(share, quantile - 1e-12)), len(values) - 1)])


def distance_threshold(validation_distances: np.ndarray, validation_groups: np.ndarray, quantile: float) -> float:
    """The feature-space threshold: the group-weighted ``quantile`` of validation distances."""
    return weighted_quantile(validation_distances, group_weights(validation_groups), quantile)
