"""Grouped k-fold cross-validation: which images train, validate and test in each round, and the
summary over rounds. Pure functions; the loop that trains is tumorscope.stages.run_crossval."""

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
