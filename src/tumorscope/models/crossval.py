"""Grouped k-fold cross-validation: which images train, validate and test in each round, and the
summary over rounds. Pure functions; the loop that trains is tumorscope.stages.crossval.run_crossval."""

from __future__ import annotations

import numpy as np


def fold_roles(folds: np.ndarray, test_fold: int, n_folds: int) -> dict[str, np.ndarray]:
    """Boolean masks of one round: ``test_fold`` tests, the next fold validates (early stopping
    and learning-rate halving watch it), every other fold trains. Duplicate groups never straddle
    folds, so none straddles the roles either."""
    val_fold = (test_fold + 1) % n_folds
    return {"train": (folds != test_fold) & (folds != val_fold), "val": folds == val_fold, "test": folds == test_fold}


def summarise_rounds(rounds: list[dict], key: str) -> dict:
    """Mean, standard deviation (n-1), min and max of one score over the rounds that define it
    (a fold without the critical class has no recall for it)."""
    values = np.array([r[key] for r in rounds if r.get(key) is not None], dtype=float)
    if not len(values):
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None}
    return {"n": int(len(values)), "mean": float(values.mean()),
            "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
            "min": float(values.min()), "max": float(values.max())}


def held_out_report(labels: np.ndarray, probabilities: np.ndarray, series: np.ndarray, images: np.ndarray,
                    classes: list[str], evaluate, seed: int) -> dict:
    """Scores of out-of-fold probabilities on a set of slices (rows of NaN, never scored, left out),
    whole series resampled for the intervals, and the same scores per orientation."""
    from tumorscope.data.audit import estimate_orientations
    from tumorscope.models.evaluate import score_predictions, summary_scores
    from tumorscope.models.shortcuts import scores_by_orientation

    scored = ~np.isnan(probabilities).any(axis=1)
    labels, probabilities, series = np.asarray(labels)[scored], probabilities[scored], np.asarray(series)[scored]
    if not scored.any():
        return {"n": 0}
    return summary_scores(score_predictions(labels, probabilities, series, classes, evaluate, seed)) | {
        "by_orientation": scores_by_orientation(labels, probabilities, series, estimate_orientations(images[scored]),
                                                classes, evaluate, seed)}
