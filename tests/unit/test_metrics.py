import numpy as np
import pytest

from helpers.params import section
from tumorscope.config import EvaluateConfig
from tumorscope.models.evaluate import (
    accuracy_by_distance,
    confusion,
    degenerate_predictions,
    expected_calibration_error,
    per_class_scores,
    score_predictions,
    summary_scores,
)

CLASSES = ["Cyst", "Normal", "Tumor"]


def compute_metrics(labels, probabilities, classes, bins: int, max_share: float) -> dict:
    """score_predictions with every slice its own duplicate group."""
    cfg = section(EvaluateConfig, calibration_bins=bins, max_single_class_share=max_share, bootstrap_samples=50)
    return score_predictions(labels, probabilities, np.arange(len(labels)), classes, cfg, seed=0)


def test_confusion_and_scores_by_hand():
    labels = np.array([0, 0, 0, 1, 1, 2])
    predicted = np.array([0, 0, 1, 1, 2, 2])
    matrix = confusion(labels, predicted, 3)
    assert matrix.tolist() == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    scores = per_class_scores(matrix)
    # Cyst: P 2/2, R 2/3; Normal: P 1/2, R 1/2; Tumor: P 1/2, R 1/1
    assert scores["precision"] == pytest.approx([1.0, 0.5, 0.5])
    assert scores["recall"] == pytest.approx([2 / 3, 0.5, 1.0])
    assert scores["f1"] == pytest.approx([0.8, 0.5, 2 / 3])


def test_ece_by_hand():
    labels = np.array([0, 1, 0, 1])
    probabilities = np.array([[0.9, 0.1], [0.9, 0.1], [0.3, 0.7], [0.4, 0.6]])
    # Bin (0.8,0.9]: conf 0.9, acc 0.5 (2 samples); bin (0.6,0.7]: conf 0.7, acc 0; bin (0.5,0.6]: conf 0.6, acc 1
    ece, bins = expected_calibration_error(labels, probabilities, 10)
    assert ece == pytest.approx(0.5 * 0.4 + 0.25 * 0.7 + 0.25 * 0.4)
    assert sum(bins["count"]) == 4


def test_perfect_classifier_metrics():
    labels = np.array([0, 1, 2, 0, 1, 2])
    probabilities = np.eye(3)[labels]
    metrics = compute_metrics(labels, probabilities, CLASSES, 10, 0.95)
    assert metrics["accuracy"] == 1.0 and metrics["macro_f1"] == 1.0
    assert metrics["macro_roc_auc_ovr"] == 1.0 and metrics["ece"] == pytest.approx(0.0)
    assert not metrics["degenerate"]


def test_constant_predictions_are_flagged():
    labels = np.array([0, 1, 2] * 10)
    probabilities = np.tile([0.2, 0.7, 0.1], (30, 1))
    metrics = compute_metrics(labels, probabilities, CLASSES, 10, 0.95)
    assert metrics["degenerate"] and "degenerate" in metrics["degenerate_reason"]
    assert metrics["per_class"]["Normal"]["recall"] == 1.0
    assert metrics["per_class"]["Cyst"]["recall"] == 0.0


def test_one_class_test_set_is_not_called_degenerate():
    labels = np.zeros(10, dtype=int)
    assert degenerate_predictions(labels, labels, 0.95) is None


def test_auc_undefined_for_absent_class():
    labels = np.array([0, 1, 0, 1])
    probabilities = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.3, 0.6, 0.1]])
    metrics = compute_metrics(labels, probabilities, CLASSES, 5, 0.95)
    assert metrics["per_class"]["Tumor"]["roc_auc_ovr"] is None
    assert metrics["macro_f1"] == 1.0  # averaged over classes present in the test split
    assert metrics["per_class"]["Tumor"]["recall"] is None and "Tumor" not in metrics["recall"]


def test_one_scoring_gives_every_caller_the_same_fields_and_types():
    """Validation, trials, folds and the test split share one scoring: the compact view a trial or a
    fold keeps is a projection of the full score, not a second computation."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 60)
    probabilities = rng.dirichlet(np.ones(3), 60)
    full = compute_metrics(labels, probabilities, CLASSES, 10, 0.95)
    compact = summary_scores(full)
    assert compact == {key: full[key] for key in compact}
    assert isinstance(full["degenerate"], bool) and isinstance(full["degenerate_reason"], str)
    assert full["critical_class"] == "Tumor" and full["critical_recall"] == full["recall"]["Tumor"]
    low, high = full["macro_f1_ci"]["low"], full["macro_f1_ci"]["high"]
    assert 0.0 <= low <= high <= 1.0


def test_accuracy_by_distance_bands_by_hand():
    distances = np.array([0, 2, 4, 6, 9, 30, 64])
    correct = np.array([True, True, False, True, False, False, True])
    bands = accuracy_by_distance(correct, distances, [4, 8])
    assert bands == [{"distance": "0-4", "n": 3, "accuracy": pytest.approx(2 / 3)},
                     {"distance": "5-8", "n": 1, "accuracy": 1.0},
                     {"distance": ">=9", "n": 3, "accuracy": pytest.approx(1 / 3)}]
    empty = accuracy_by_distance(correct[:2], distances[:2], [4, 8])
    assert empty[1] == {"distance": "5-8", "n": 0, "accuracy": None}
