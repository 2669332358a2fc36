"""Grouped k-fold: fold assignment, the roles of one round, the summary, and scores of a fold
that lacks a class."""

from __future__ import annotations

import numpy as np
import pytest

from helpers.params import defaults
from tumorscope.data.split import grouped_folds
from tumorscope.models.crossval import fold_roles, summarise_rounds


def _grouped_labels(seed: int = 0):
    """300 images of 3 classes in groups of 1-9 images, each group one class."""
    rng = np.random.default_rng(seed)
    labels, groups = [], []
    group = 0
    while len(labels) < 300:
        size = int(rng.integers(1, 10))
        labels += [["A", "B", "C"][group % 3]] * size
        groups += [group] * size
        group += 1
    return np.array(labels), np.array(groups)


def test_every_group_sits_in_one_fold_and_classes_spread_evenly():
    labels, groups = _grouped_labels()
    folds = grouped_folds(labels, groups, 5, seed=1)
    assert set(folds) == set(range(5))
    for group in np.unique(groups):
        assert len(set(folds[groups == group])) == 1
    largest_group = np.bincount(groups).max()
    for label in "ABC":
        per_fold = np.bincount(folds[labels == label], minlength=5)
        # Stratified up to the granularity of whole groups.
        assert per_fold.max() - per_fold.min() <= 2 * largest_group, per_fold
    assert np.array_equal(folds, grouped_folds(labels, groups, 5, seed=1))


def test_the_roles_of_a_round_partition_the_images():
    folds = np.repeat(np.arange(4), 3)
    for test_fold in range(4):
        roles = fold_roles(folds, test_fold, 4)
        stacked = np.stack([roles["train"], roles["val"], roles["test"]])
        assert np.array_equal(stacked.sum(axis=0), np.ones(12))  # each image has exactly one role
        assert set(folds[roles["test"]]) == {test_fold}
        assert set(folds[roles["val"]]) == {(test_fold + 1) % 4}
    # Over the rounds every image is tested exactly once.
    assert np.array_equal(sum(fold_roles(folds, f, 4)["test"].astype(int) for f in range(4)), np.ones(12))


def test_summary_skips_rounds_without_the_score():
    rounds = [{"critical_recall": 0.5}, {"critical_recall": None}, {"critical_recall": 1.0}]
    summary = summarise_rounds(rounds, "critical_recall")
    assert summary["n"] == 2 and summary["mean"] == pytest.approx(0.75)
    assert (summary["min"], summary["max"]) == (0.5, 1.0)
    assert summary["std"] == pytest.approx(np.std([0.5, 1.0], ddof=1))
    assert summarise_rounds([{"critical_recall": None}], "critical_recall")["mean"] is None


def test_a_fold_without_the_critical_class_has_no_recall_for_it():
    """A fold without tumour slices missed no tumour: its tumour recall is undefined, not 0."""
    from tumorscope.models.evaluate import flat_scores, score_predictions

    classes = ["Cyst", "Normal", "Stone", "Tumor"]
    labels = np.repeat(np.arange(3), 4)  # no Tumor
    scores = score_predictions(labels, np.eye(4)[labels], np.arange(12), classes, defaults().evaluate, 0)
    assert scores["critical_recall"] is None and scores["critical_recall_ci"] is None
    assert scores["recall"] == {"Cyst": 1.0, "Normal": 1.0, "Stone": 1.0}
    assert scores["macro_f1"] == 1.0
    assert "critical_recall" not in " ".join(flat_scores(scores, "test_"))  # MLflow gets no None
