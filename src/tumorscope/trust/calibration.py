"""Post-hoc temperature scaling (Guo et al. 2017) of a classifier that outputs probabilities.

The models end in a softmax, so their log-probabilities are logits up to a per-row constant, which
softmax ignores: dividing log p by a temperature T and taking the softmax again is exactly
temperature scaling of the logits. T > 1 softens an over-confident model, T < 1 sharpens an
under-confident one; the arg-max, and so every class decision, is unchanged. T is fitted on the
validation split by minimising the negative log-likelihood, never on the test split.
"""

from __future__ import annotations

import numpy as np

# Softmax outputs of 0 (float32 underflow) would give log 0; any floor far below float32's
# resolution around 1 keeps the order of the classes and a finite loss.
PROBABILITY_FLOOR = 1e-12
# T is searched on log T in [-LOG_T_BOUND, LOG_T_BOUND]: temperatures from 1/20 to 20.
LOG_T_BOUND = 3.0


def log_probabilities(probabilities: np.ndarray) -> np.ndarray:
    return np.log(np.clip(np.asarray(probabilities, dtype=np.float64), PROBABILITY_FLOOR, 1.0))


def apply_temperature(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log p / T), row by row, in float64."""
    scaled = log_probabilities(probabilities) / float(temperature)
    scaled -= scaled.max(axis=1, keepdims=True)
    exp = np.exp(scaled)
    return exp / exp.sum(axis=1, keepdims=True)


def negative_log_likelihood(labels: np.ndarray, probabilities: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Mean -log p(true class), optionally weighted (weights need not sum to 1)."""
    labels = np.asarray(labels, dtype=np.int64)
    picked = log_probabilities(probabilities)[np.arange(len(labels)), labels]
    return float(-np.average(picked, weights=weights))


def group_weights(groups: np.ndarray) -> np.ndarray:
    """1 / (slices in its group) for each slice: every duplicate group (about one scan series)
    counts once, so a long series of near-identical slices does not outvote the others."""
    _, inverse, counts = np.unique(np.asarray(groups), return_inverse=True, return_counts=True)
    return 1.0 / counts[inverse]


def fit_temperature(labels: np.ndarray, probabilities: np.ndarray, groups: np.ndarray | None = None) -> float:
    """The temperature that minimises the (group-weighted) validation NLL.

    NLL is convex in 1/T, so a bounded scalar search on log T finds the one minimum."""
    from scipy.optimize import minimize_scalar

    if len(labels) == 0:
        raise ValueError("cannot fit a temperature on an empty validation split")
    weights = None if groups is None else group_weights(groups)
    result = minimize_scalar(lambda log_t: negative_log_likelihood(labels, apply_temperature(probabilities, np.exp(log_t)),
                                                                   weights),
                             bounds=(-LOG_T_BOUND, LOG_T_BOUND), method="bounded", options={"xatol": 1e-4})
    return float(np.exp(result.x))
