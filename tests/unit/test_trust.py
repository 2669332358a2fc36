"""Temperature scaling and group-aware conformal prediction sets, on synthetic scores whose truth is known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tumorscope.trust import conformal
from tumorscope.trust.calibration import apply_temperature, fit_temperature, group_weights, negative_log_likelihood

ALPHA = 0.1


def calibrated_model(rng, n_groups: int, n_classes: int = 4, slice_noise: float = 0.3):
    """Groups of correlated slices like the series of a CT scan, one label per group drawn from the
    group's probabilities (calibrated by construction), each slice's probabilities around them:
    (probabilities, labels, groups)."""
    size = rng.integers(1, 12, n_groups)
    groups = np.repeat(np.arange(n_groups), size)
    centre = rng.normal(0, 1.5, (n_groups, n_classes))
    centre_p = np.exp(centre) / np.exp(centre).sum(axis=1, keepdims=True)
    group_labels = (centre_p.cumsum(axis=1) > rng.random((n_groups, 1))).argmax(axis=1)
    logits = centre[groups] + rng.normal(0, slice_noise, (len(groups), n_classes))
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return probabilities, group_labels[groups], groups


def test_temperature_scaling_recovers_the_over_confidence_of_a_sharpened_model():
    rng = np.random.default_rng(1)
    probabilities, labels, groups = calibrated_model(rng, 3000, slice_noise=0.0)
    over_confident = apply_temperature(probabilities, 1 / 3)  # logits times 3
    temperature = fit_temperature(labels, over_confident, groups)
    assert temperature == pytest.approx(3.0, rel=0.15)
    weights = group_weights(groups)
    before = negative_log_likelihood(labels, over_confident, weights)
    after = negative_log_likelihood(labels, apply_temperature(over_confident, temperature), weights)
    assert after < before - 0.1
    # Scaling never changes a decision.
    assert (apply_temperature(over_confident, temperature).argmax(1) == over_confident.argmax(1)).all()


def test_an_under_confident_model_is_sharpened():
    rng = np.random.default_rng(2)
    probabilities, labels, groups = calibrated_model(rng, 3000, slice_noise=0.0)
    assert fit_temperature(labels, apply_temperature(probabilities, 2.5), groups) < 0.6


def test_apply_temperature_one_is_the_identity_and_rows_sum_to_one():
    probabilities = np.array([[0.7, 0.2, 0.1], [0.0, 0.5, 0.5]])
    assert np.allclose(apply_temperature(probabilities, 1.0), probabilities, atol=1e-9)
    assert np.allclose(apply_temperature(probabilities, 4.0).sum(axis=1), 1.0)


def test_scores_by_hand():
    p = np.array([[0.5, 0.3, 0.2]])
    assert np.allclose(conformal.class_scores(p, "lac"), [[0.5, 0.7, 0.8]])
    assert np.allclose(conformal.class_scores(p, "aps"), [[0.5, 0.8, 1.0]])
    with pytest.raises(ValueError, match="unknown conformal score 'raps'"):
        conformal.class_scores(p, "raps")


def test_a_group_counts_once_in_the_quantile():
    """Slices that repeat their group's score give the quantile of one score per group."""
    rng = np.random.default_rng(3)
    per_group = rng.random(39)
    sizes = rng.integers(1, 30, 39)
    scores, groups = np.repeat(per_group, sizes), np.repeat(np.arange(39), sizes)
    textbook = np.sort(per_group)[math.ceil((39 + 1) * (1 - ALPHA)) - 1]
    assert conformal.weighted_conformal_quantile(scores, groups, ALPHA) == textbook
    # Slice-counting would let the longest series decide it.
    assert conformal.weighted_conformal_quantile(scores, np.arange(len(scores)), ALPHA) != textbook


def test_too_few_groups_justify_no_threshold_and_every_class_is_in_the_set():
    thresholds = conformal.calibrate(np.full((20, 4), 0.25), np.zeros(20, int), np.repeat(np.arange(5), 4), ALPHA,
                                     "lac", class_conditional=False)
    assert thresholds == [math.inf] * 4
    assert conformal.prediction_sets(np.array([[0.97, 0.01, 0.01, 0.01]]), thresholds, "lac").all()


@pytest.mark.parametrize("score", conformal.SCORES)
@pytest.mark.parametrize("class_conditional", [False, True])
def test_coverage_over_repeated_calibration_and_test_partitions(score, class_conditional):
    """Mean coverage of new groups is at least 1 - alpha and not much more (the finite-sample
    correction adds at most 1 / (groups + 1)); per class when class-conditional, the tumour class
    (the rarest here) included."""
    rng = np.random.default_rng(4)
    covered, tumour_covered, tumour_groups = [], [], []
    for _ in range(150):
        probabilities, labels, groups = calibrated_model(rng, 600)
        rarer = (labels == 3) & (groups % 2 == 0)
        labels[rarer] = 0  # half the tumour series become cysts: a rarer tumour class
        chosen = rng.permutation(600)[:300]
        calibration = np.isin(groups, chosen)
        thresholds = conformal.calibrate(probabilities[calibration], labels[calibration], groups[calibration], ALPHA,
                                         score, class_conditional)
        sets = conformal.prediction_sets(probabilities[~calibration], thresholds, score)
        test_labels, test_groups = labels[~calibration], groups[~calibration]
        hit = sets[np.arange(len(test_labels)), test_labels]
        covered.append(np.average(hit, weights=group_weights(test_groups)))
        tumour = test_labels == 3
        tumour_covered.append(np.average(hit[tumour], weights=group_weights(test_groups[tumour])))
        tumour_groups.append(len(np.unique(groups[calibration][labels[calibration] == 3])))
    slack = 1 / (min(tumour_groups) + 1) if class_conditional else 1 / 301
    assert 1 - ALPHA - 0.01 <= np.mean(covered) <= 1 - ALPHA + slack + 0.01
    if class_conditional:
        assert np.mean(tumour_covered) >= 1 - ALPHA - 0.01


def test_a_blank_slice_and_an_intensity_no_training_slice_has_are_referred_with_the_reason():
    from tumorscope.monitoring.features import pixel_features
    from tumorscope.trust.ood import (
        distance_threshold,
        fit_intensity_density,
        input_reason,
        intensity_vectors,
        mahalanobis_distance,
    )

    rng = np.random.default_rng(5)

    def slices(n, mean=90.0, spread=30.0):
        return np.clip(rng.normal(mean, rng.uniform(0.8, 1.2, (n, 1, 1)) * spread, (n, 32, 32)), 0, 255).astype(np.uint8)

    density = fit_intensity_density(pixel_features(slices(300)))
    validation = slices(200)
    threshold = distance_threshold(mahalanobis_distance(intensity_vectors(pixel_features(validation)), density),
                                   np.arange(200), 0.99)

    def reason(image):
        features = pixel_features(image[None])
        distance = float(mahalanobis_distance(intensity_vectors(features), density)[0])
        return input_reason({k: float(v[0]) for k, v in features.items()}, density, distance, threshold)

    assert sum(reason(image) is not None for image in slices(100)) <= 5  # about 1 % of ordinary slices
    assert reason(np.full((32, 32), 255, np.uint8)).startswith("blank or constant image")
    assert reason(np.zeros((32, 32), np.uint8)).startswith("blank or constant image")
    bright = reason(slices(1, mean=200.0)[0])
    assert bright.startswith("intensity and texture unlike the training slices (distance")
    assert "most unusual: " in bright
    smooth = slices(1)[0].astype(float)
    smooth = ((smooth + np.roll(smooth, 1, 0) + np.roll(smooth, 1, 1) + np.roll(smooth, 1, (0, 1))) / 4).astype(np.uint8)
    assert reason(smooth) is not None  # same grey levels, another texture (a softer kernel, less noise)


def test_the_feature_space_threshold_refers_the_far_and_keeps_about_the_quantile_of_the_near():
    from tumorscope.trust.ood import distance_threshold, fit_feature_density, mahalanobis_distance

    rng = np.random.default_rng(6)
    centres = rng.normal(0, 3, (3, 16))

    def embeddings(n):
        labels = rng.integers(0, 3, n)
        return centres[labels] + rng.normal(0, 1, (n, 16)) * np.linspace(0.2, 2, 16), labels

    density = fit_feature_density(*embeddings(600), n_classes=4)  # class 3 has no training slices
    assert density["means"][3] is None
    validation, _ = embeddings(400)
    threshold = distance_threshold(mahalanobis_distance(validation, density), np.arange(400), 0.95)
    same, _ = embeddings(2000)
    assert 0.02 <= (mahalanobis_distance(same, density) > threshold).mean() <= 0.09  # about 1 - 0.95
    # Far in the directions training barely varies in, though no farther from a mean in plain distance.
    shifted = same[:200] + np.where(np.arange(16) < 3, 2.5, 0.0)
    assert (mahalanobis_distance(shifted, density) > threshold).mean() > 0.8
    assert (mahalanobis_distance(rng.normal(0, 3, (200, 16)) * 4, density) > threshold).mean() > 0.9


def test_the_first_reason_to_refer_is_the_one_given():
    from tumorscope.trust.answers import refer_reason

    assert refer_reason("blank or constant image (...)", 99.0, 5.0, []).startswith("blank")
    assert refer_reason(None, 9.5, 5.0, ["Cyst"]).startswith("unlike the training slices in the model's features (distance 9.5 > 5.0)")
    assert refer_reason(None, 1.0, 5.0, []) == "no class is plausible enough (empty prediction set)"
    assert refer_reason(None, 1.0, 5.0, ["Stone", "Tumor"]) == "the model cannot tell Stone / Tumor apart (prediction set of 2)"
    assert refer_reason(None, 1.0, 5.0, ["Tumor"]) is None
    plane = "coronal slice: the model learnt from only 2 coronal series (< audit.min_series 10)"
    assert refer_reason(None, 9.5, 5.0, ["Tumor"], plane) == plane  # before the features' distance
    assert refer_reason("blank or constant image (...)", 1.0, 5.0, ["Tumor"], plane).startswith("blank")


def test_an_orientation_with_too_few_training_series_is_referred_with_that_reason():
    from tumorscope.trust.answers import orientation_reason

    state = {"min_series": 10, "series": {"axial": 40, "coronal": 2, "other": 0}}
    assert orientation_reason("axial", state) is None
    assert orientation_reason("coronal", state) == ("coronal slice: the model learnt from only 2 coronal series "
                                                    "(< audit.min_series 10)")
    assert orientation_reason("other", state).startswith("other slice: the model learnt from only 0")
    assert orientation_reason("coronal", None) is None  # a model fitted before orientation was recorded


def test_group_bootstrap_shares_and_ece_agree_with_the_point_scores():
    from tumorscope.models.evaluate import expected_calibration_error
    from tumorscope.trust.assessment import GroupBootstrap, risk_coverage

    rng = np.random.default_rng(7)
    probabilities, labels, groups = calibrated_model(rng, 80)
    bootstrap = GroupBootstrap(groups, n_samples=300, confidence=0.9, seed=0)
    hits = probabilities.argmax(1) == labels
    share = bootstrap.mean(hits)
    assert share["value"] == pytest.approx(hits.mean()) and share["low"] < share["value"] < share["high"]
    among = labels == 0
    assert bootstrap.mean(hits, among)["value"] == pytest.approx(hits[among].mean())
    ece, table = bootstrap.ece(labels, probabilities, 10)
    assert (ece["value"], table) == (pytest.approx(expected_calibration_error(labels, probabilities, 10)[0]),
                                     expected_calibration_error(labels, probabilities, 10)[1])
    assert ece["low"] <= ece["high"]
    assert bootstrap.mean(hits, np.zeros(len(hits), bool)) == {"value": None, "low": None, "high": None}
    curve = risk_coverage(labels, probabilities)
    assert curve[-1] == {"coverage": 1.0, "risk": pytest.approx(1 - hits.mean())}
    assert curve[0]["risk"] in (0.0, 1.0) and len(curve) == len(labels)
