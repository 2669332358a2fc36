"""Fit the trust state of a trained model on its training and validation slices, and judge new
answers with it: calibrated probabilities, a prediction set, an out-of-distribution distance and
whether a radiologist should look (``refer``) with the one-line reason.

The state is a small JSON-able dict stored with the model (train.json and the MLflow model's
metadata), so evaluation, ``tumorscope predict`` and the service apply the same numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from tumorscope.data.audit import estimate_orientations, orientation_series
from tumorscope.trust import calibration, conformal
from tumorscope.trust import ood as ood_checks


def _finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def fit_trust(model, train: tuple[np.ndarray, np.ndarray], validation: tuple[np.ndarray, np.ndarray, np.ndarray],
              n_classes: int, conformal_cfg, ood_cfg, train_groups: np.ndarray | None = None,
              min_series: int | None = None, seed: int = 0) -> dict:
    """``train`` is (images, labels); ``validation`` (images, labels, duplicate-group ids).
    Temperature, conformal thresholds and the feature-space threshold come from validation slices
    only; the intensity statistics' and the embeddings' distributions from training slices (each
    with export-randomised copies given ``ood.export_augment``, drawn from ``seed``). With
    ``train_groups`` and ``min_series`` (``audit.min_series``), the training series per
    orientation: a slice of an orientation with fewer is referred."""
    from tumorscope.monitoring.features import model_outputs, pixel_features

    train_images, train_labels = train
    val_images, val_labels, val_groups = validation
    val_probabilities, val_embeddings = model_outputs(model, val_images, ood_cfg.embedding_dims)
    temperature = calibration.fit_temperature(val_labels, val_probabilities, val_groups)
    calibrated = calibration.apply_temperature(val_probabilities, temperature)
    thresholds = conformal.calibrate(calibrated, val_labels, val_groups, conformal_cfg.alpha, conformal_cfg.score,
                                     conformal_cfg.class_conditional)
    # The out-of-distribution checks accept what they are fitted on: with ood.export_augment, the
    # slices and an export-randomised copy of each (another export's look of the same anatomy).
    copies = 2 if ood_cfg.export_augment > 0 else 1
    ood_train = with_export_copies(train_images, ood_cfg.export_augment, seed)
    ood_val = with_export_copies(val_images, ood_cfg.export_augment, seed + 1)
    ood_train_labels, ood_val_groups = np.tile(train_labels, copies), np.tile(val_groups, copies)
    _, train_embeddings = model_outputs(model, ood_train, ood_cfg.embedding_dims)
    if copies > 1:
        _, val_embeddings = model_outputs(model, ood_val, ood_cfg.embedding_dims)
    density = ood_checks.fit_feature_density(train_embeddings, ood_train_labels, n_classes)
    distances = ood_checks.mahalanobis_distance(val_embeddings, density)
    intensity = ood_checks.fit_intensity_density(pixel_features(ood_train))
    intensity_distances = ood_checks.mahalanobis_distance(ood_checks.intensity_vectors(pixel_features(ood_val)),
                                                          intensity)
    weights = calibration.group_weights(val_groups)
    orientation = None
    if train_groups is not None and min_series is not None:
        orientation = {"min_series": min_series,
                       "series": orientation_series(train_labels, train_groups, estimate_orientations(train_images))}
    return {
        "orientation": orientation,
        "temperature": temperature,
        "validation_nll": {"before": calibration.negative_log_likelihood(val_labels, val_probabilities, weights),
                           "after": calibration.negative_log_likelihood(val_labels, calibrated, weights)},
        "conformal": {"alpha": conformal_cfg.alpha, "score": conformal_cfg.score,
                      "class_conditional": conformal_cfg.class_conditional,
                      "n_groups": int(len(np.unique(val_groups))),
                      # null: too few validation groups to justify any threshold (every class is in the set)
                      "thresholds": [_finite_or_none(t) for t in thresholds]},
        "ood": {"quantile": ood_cfg.quantile, "embedding_dims": ood_cfg.embedding_dims,
                "export_augment": ood_cfg.export_augment,
                "distance_threshold": ood_checks.distance_threshold(distances, ood_val_groups, ood_cfg.quantile),
                "feature_density": density,
                "intensity_quantile": ood_cfg.intensity_quantile,
                "intensity_threshold": ood_checks.distance_threshold(intensity_distances, ood_val_groups,
                                                                     ood_cfg.intensity_quantile),
                "intensity_density": intensity},
    }


def with_export_copies(images: np.ndarray, probability: float, seed: int) -> np.ndarray:
    """``images``, followed with ``probability`` > 0 by an export-randomised copy of each
    (``data.augment.randomise_export``, each transform with that probability)."""
    if probability <= 0:
        return images
    from tumorscope.data.augment import randomise_export

    images = np.asarray(images)
    return np.concatenate([images, randomise_export(images, probability, np.random.default_rng(seed))])


@dataclass
class Judged:
    probabilities: np.ndarray   # (N, K) calibrated
    sets: np.ndarray            # (N, K) bool: the conformal prediction sets
    ood_distance: np.ndarray    # (N,) Mahalanobis distance to the nearest training class
    reasons: list[str | None]   # why to refer each answer; None: the model may decide
    ood: np.ndarray             # (N,) bool: referred as unlike the training slices (input or features), not for doubt
    orientations: list[str]     # axial / coronal / other, from the body outline (data.audit)

    @property
    def refer(self) -> np.ndarray:
        return np.array([reason is not None for reason in self.reasons], dtype=bool)

    def answer(self, i: int, classes: list[str]) -> dict:
        """The trust fields of answer ``i`` as the service, its log and the page show them."""
        return {"calibrated_probabilities": dict(zip(classes, (float(p) for p in self.probabilities[i]), strict=True)),
                "prediction_set": [classes[k] for k in np.flatnonzero(self.sets[i])],
                "refer": self.reasons[i] is not None, "refer_reason": self.reasons[i],
                "ood": bool(self.ood[i]), "ood_distance": float(self.ood_distance[i]),
                "orientation": self.orientations[i]}


def thresholds_of(state: dict) -> list[float]:
    return [math.inf if t is None else t for t in state["conformal"]["thresholds"]]


# Every orientation reason holds this (``trust.assessment`` counts referrals by reason).
ORIENTATION_REASON = " slice: the model learnt from only "


def orientation_reason(orientation: str, state: dict | None) -> str | None:
    """Why a slice's orientation makes its answer untrustworthy: too few training series in it
    (``state`` is the trust state's ``orientation``; None for a model fitted without it)."""
    if state is None:
        return None
    series = int(state["series"].get(orientation, 0))
    if series < state["min_series"]:
        return (f"{orientation}{ORIENTATION_REASON}{series} {orientation} series "
                f"(< audit.min_series {state['min_series']})")
    return None


def refer_reason(pixel_reason: str | None, distance: float, threshold: float, in_set: list[str],
                 plane_reason: str | None = None) -> str | None:
    """The first reason not to let the model decide, in the order a reader should hear them."""
    if pixel_reason is not None:
        return pixel_reason
    if plane_reason is not None:
        return plane_reason
    if distance > threshold:
        return f"unlike the training slices in the model's features (distance {distance:.1f} > {threshold:.1f})"
    if len(in_set) == 0:
        return "no class is plausible enough (empty prediction set)"
    if len(in_set) > 1:
        return f"the model cannot tell {' / '.join(in_set)} apart (prediction set of {len(in_set)})"
    return None


def judge(probabilities: np.ndarray, embeddings: np.ndarray, images: np.ndarray, classes: list[str],
          state: dict) -> Judged:
    """Apply a fitted state to the model's raw probabilities, embeddings and the prepared images."""
    from tumorscope.monitoring.features import pixel_features

    calibrated = calibration.apply_temperature(probabilities, state["temperature"])
    sets = conformal.prediction_sets(calibrated, thresholds_of(state), state["conformal"]["score"])
    ood = state["ood"]
    distances = ood_checks.mahalanobis_distance(embeddings, ood["feature_density"])
    features = pixel_features(images)
    intensity = ood_checks.mahalanobis_distance(ood_checks.intensity_vectors(features), ood["intensity_density"])
    orientations = [str(o) for o in estimate_orientations(images)]
    reasons, unlike = [], np.zeros(len(calibrated), dtype=bool)
    for i in range(len(calibrated)):
        pixel_reason = ood_checks.input_reason({name: float(values[i]) for name, values in features.items()},
                                               ood["intensity_density"], float(intensity[i]), ood["intensity_threshold"])
        unlike[i] = pixel_reason is not None or distances[i] > ood["distance_threshold"]
        in_set = [classes[k] for k in np.flatnonzero(sets[i])]
        reasons.append(refer_reason(pixel_reason, float(distances[i]), ood["distance_threshold"], in_set,
                                    orientation_reason(orientations[i], state.get("orientation"))))
    return Judged(calibrated, sets, distances, reasons, unlike, orientations)
