"""Split-conformal prediction sets that respect duplicate groups and, optionally, each class.

A score says how unusual a candidate class is for an image (higher: less plausible). On the
calibration split (the validation split: apart from training and from test) the score of the true
class is collected; its quantile q at level 1 - alpha becomes the threshold, and a new image's set
holds every class whose score is at most q. If calibration and new images are exchangeable, the set
holds the true class with probability at least 1 - alpha (Vovk et al.; Angelopoulos & Bates 2021).

Two departures from the textbook, both because of what CT slices are:
- **Groups, not slices.** Neighbouring slices of one series are near-duplicates: 40 slices of one
  series are about one piece of evidence, not 40. Each slice is weighted 1 / (slices of its group
  in the calibration set), so every group counts once, and the finite-sample correction uses the
  number of groups: level ceil((G + 1)(1 - alpha)) / G. With one slice per group this is the
  textbook quantile; with fewer than 1/alpha - 1 groups no finite threshold is justified and every
  set holds every class (the answer is referred).
- **Per class (Mondrian).** With ``class_conditional`` the threshold is computed separately for the
  slices of each true class, so each class, the tumour class included, keeps its own coverage
  instead of an average that a rare, hard class can fall below.
"""

from __future__ import annotations

import math

import numpy as np

from tumorscope.trust.calibration import group_weights

SCORES = ("lac", "aps")


def class_scores(probabilities: np.ndarray, score: str) -> np.ndarray:
    """(N, K) nonconformity of every candidate class.

    ``lac`` (least ambiguous set-valued classifier, Sadinle et al. 2019): 1 - p_k; the smallest
    sets on average. ``aps`` (adaptive prediction sets, Romano et al. 2020), non-randomised: the
    probability mass of the classes ranked at or above k; sets grow when the model is unsure."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if score == "lac":
        return 1.0 - probabilities
    if score == "aps":
        order = np.argsort(-probabilities, axis=1, kind="stable")
        cumulative = np.cumsum(np.take_along_axis(probabilities, order, axis=1), axis=1)
        scores = np.empty_like(probabilities)
        np.put_along_axis(scores, order, cumulative, axis=1)
        return scores
    raise ValueError(f"unknown conformal score {score!r}: expected one of {', '.join(SCORES)}")


def weighted_quantile(values: np.ndarray, weights: np.ndarray, quantile: float) -> float:
    """The smallest value whose weighted cumulative share reaches ``quantile`` (+inf for no values)."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return math.inf
    order = np.argsort(values, kind="stable")
    share = np.cumsum(np.asarray(weights, dtype=np.float64)[order])
    share /= share[-1]
    # The float sum of weights can land a hair below an exact level such as 1.0.
    return float(values[order][min(int(np.searchsorted(share, quantile - 1e-12, side="left")), len(values) - 1)])


def weighted_conformal_quantile(scores: np.ndarray, groups: np.ndarray, alpha: float) -> float:
    """The smallest calibration score at which the group-weighted share of scores at or below it
    reaches ceil((G + 1)(1 - alpha)) / G; +inf when that level exceeds 1 (too few groups)."""
    if len(scores) == 0:
        return math.inf
    n_groups = len(np.unique(np.asarray(groups)))
    level = math.ceil((n_groups + 1) * (1.0 - alpha)) / n_groups
    return math.inf if level > 1.0 else weighted_quantile(scores, group_weights(groups), level)


def calibrate(probabilities: np.ndarray, labels: np.ndarray, groups: np.ndarray, alpha: float, score: str,
              class_conditional: bool) -> list[float]:
    """Per-class thresholds (all equal when not class-conditional) from the calibration split."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"conformal alpha must be between 0 and 1, got {alpha}")
    labels = np.asarray(labels, dtype=np.int64)
    groups = np.asarray(groups)
    n_classes = np.asarray(probabilities).shape[1]
    true_scores = class_scores(probabilities, score)[np.arange(len(labels)), labels]
    if not class_conditional:
        return [weighted_conformal_quantile(true_scores, groups, alpha)] * n_classes
    return [weighted_conformal_quantile(true_scores[labels == k], groups[labels == k], alpha) for k in range(n_classes)]


def prediction_sets(probabilities: np.ndarray, thresholds: list[float], score: str) -> np.ndarray:
    """(N, K) booleans: class k is in an image's set when its score is at most the class's threshold."""
    return class_scores(probabilities, score) <= np.asarray(thresholds, dtype=np.float64)[None, :]


def coverage(sets: np.ndarray, labels: np.ndarray) -> float:
    """Share of images whose set holds the true class."""
    labels = np.asarray(labels, dtype=np.int64)
    return float(sets[np.arange(len(labels)), labels].mean()) if len(labels) else math.nan
