"""Has the model learnt a finding, or the acquisition? Checks every evaluation runs beside the model.

- **Acquisition-only baselines on the same split**: a logistic regression fitted on the training
  slices' intensity and texture statistics (``data.audit.acquisition_features``) and one on a tiny
  thumbnail, scored on the same test slices as the model; the model's macro-F1 minus each
  baseline's with a paired group bootstrap. The model *beats* a baseline when the lower end of
  that interval is above 0.
- **Body masked out**: the model's answers on the test slices with the body set to the air's
  level (``data.audit.mask_body``): only background, table and border left. Accuracy well above
  the majority class's share means the model reads the acquisition.
- **By orientation**: the model's scores on axial, coronal and other test slices apart: a data set
  that is mostly coronal can hide a model that fails on the axial slices a hospital reads.
"""

from __future__ import annotations

import numpy as np

from tumorscope.data.audit import (
    acquisition_features,
    baseline_probabilities,
    baseline_scores,
    estimate_orientations,
    fit_baseline,
    thumbnails,
)
from tumorscope.models.evaluate import (
    confusion,
    format_interval,
    macro_f1_from_confusion,
    paired_group_bootstrap,
    score_predictions,
    summary_scores,
)

BASELINES = ("intensity", "thumbnail")


def baseline_features(name: str, images: np.ndarray, thumbnail_size: int) -> np.ndarray:
    if name == "intensity":
        return acquisition_features(images)
    return thumbnails(images, thumbnail_size)


def compare_with_baselines(labels: np.ndarray, model_probabilities: np.ndarray, baselines: dict[str, np.ndarray],
                           groups: np.ndarray, classes: list[str], evaluate, seed: int) -> dict:
    """Each baseline's scores on these slices, and the model's paired macro-F1 difference against
    it (whole groups resampled). Rows of NaN (slices never scored) are left out."""
    scored = ~np.isnan(model_probabilities).any(axis=1)
    labels, groups = np.asarray(labels)[scored], np.asarray(groups)[scored]
    model_predicted = np.asarray(model_probabilities)[scored].argmax(axis=1)
    out = {}
    for name, probabilities in baselines.items():
        probabilities = np.asarray(probabilities)[scored]
        difference = paired_group_bootstrap(labels, model_predicted, probabilities.argmax(axis=1), groups,
                                            len(classes), evaluate.bootstrap_samples, evaluate.confidence, seed)
        out[name] = baseline_scores(labels, probabilities, groups, classes, evaluate.critical_class,
                                    evaluate.bootstrap_samples, evaluate.confidence, seed) | {
            "model_minus_baseline": difference, "model_beats": bool(difference["low"] > 0)}
    return out


def acquisition_baselines(train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray, np.ndarray],
                          model_probabilities: np.ndarray, classes: list[str], thumbnail_size: int, evaluate,
                          seed: int) -> dict:
    """Each baseline fitted on ``train`` (images, labels), scored on ``test`` (images, labels,
    groups), and the model's paired macro-F1 difference against it."""
    (train_images, train_labels), (test_images, test_labels, test_groups) = train, test
    baselines = {}
    for name in BASELINES:
        fitted = fit_baseline(baseline_features(name, train_images, thumbnail_size), train_labels, len(classes), seed)
        baselines[name] = baseline_probabilities(fitted, baseline_features(name, test_images, thumbnail_size),
                                                 len(classes))
    return compare_with_baselines(test_labels, model_probabilities, baselines, test_groups, classes, evaluate, seed)


def fold_baselines(images: np.ndarray, labels: np.ndarray, folds: np.ndarray, other: np.ndarray | None,
                   other_folds: np.ndarray | None, n_classes: int, thumbnail_size: int,
                   seed: int) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """Out-of-fold probabilities of each acquisition-only baseline, fitted on every fold but the
    one it scores, on the training source's slices and on another source's slices of that fold
    (``other``/``other_folds``; NaN rows where no fold may score a slice)."""
    out = {}
    for name in BASELINES:
        features = baseline_features(name, images, thumbnail_size)
        other_features = None if other is None else baseline_features(name, other, thumbnail_size)
        main = np.full((len(labels), n_classes), np.nan)
        cross = None if other is None else np.full((len(other), n_classes), np.nan)
        for fold in np.unique(folds):
            test = folds == fold
            fitted = fit_baseline(features[~test], labels[~test], n_classes, seed)
            main[test] = baseline_probabilities(fitted, features[test], n_classes)
            if cross is not None and other_features is not None and other_folds is not None and np.any(other_folds == fold):
                cross[other_folds == fold] = baseline_probabilities(fitted, other_features[other_folds == fold],
                                                                    n_classes)
        out[name] = (main, cross)
    return out


def masked_body_scores(labels: np.ndarray, masked_probabilities: np.ndarray, n_classes: int) -> dict:
    """Accuracy and macro-F1 of the model on body-masked slices, beside what no information
    gives: the majority class's share."""
    labels = np.asarray(labels)
    predicted = np.asarray(masked_probabilities).argmax(axis=1)
    counts = np.bincount(labels, minlength=n_classes)
    return {"accuracy": float(np.mean(predicted == labels)) if len(labels) else None,
            "macro_f1": float(macro_f1_from_confusion(confusion(labels, predicted, n_classes)[None])[0]),
            "majority_share": float(counts.max() / max(len(labels), 1)),
            "prediction_share": (np.bincount(predicted, minlength=n_classes) / max(len(labels), 1)).tolist()}


def scores_by_orientation(labels: np.ndarray, probabilities: np.ndarray, groups: np.ndarray,
                          orientations: np.ndarray, classes: list[str], evaluate, seed: int) -> dict:
    """``summary_scores`` of the test slices of each orientation present."""
    orientations = np.asarray(orientations, dtype=object)
    return {str(o): summary_scores(score_predictions(labels[orientations == o], probabilities[orientations == o],
                                                     groups[orientations == o], classes, evaluate, seed))
            for o in sorted(set(orientations.tolist()))}


def shortcut_audit(train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray, np.ndarray],
                   model_probabilities: np.ndarray, masked_probabilities: np.ndarray, classes: list[str],
                   thumbnail_size: int, evaluate, seed: int) -> dict:
    """The three checks on one split (see the module's doc)."""
    images, labels, groups = test
    baselines = acquisition_baselines(train, test, model_probabilities, classes, thumbnail_size, evaluate, seed)
    return {"acquisition_baselines": baselines,
            "beats_acquisition_baselines": all(b["model_beats"] for b in baselines.values()),
            "masked_body": masked_body_scores(labels, masked_probabilities, len(classes)),
            "by_orientation": scores_by_orientation(labels, model_probabilities, groups, estimate_orientations(images),
                                                    classes, evaluate, seed)}


def shortcut_line(audit: dict) -> str:
    """One line: does the model beat what the acquisition alone predicts, and what it does blind."""
    parts = []
    for name, baseline in audit["acquisition_baselines"].items():
        diff = baseline["model_minus_baseline"]
        verdict = "beats" if baseline["model_beats"] else "does NOT beat"
        parts.append(f"{verdict} the {name} baseline ({baseline['macro_f1']:.3f}; difference "
                     f"{diff['macro_f1_difference']:+.3f} [{diff['low']:+.3f}, {diff['high']:+.3f}])")
    masked = audit["masked_body"]
    orientation = ", ".join(f"{o} {s['macro_f1']:.3f}{format_interval(s['macro_f1_ci'])} (n={s['n']})"
                            for o, s in audit["by_orientation"].items())
    return (f"the model {'; '.join(parts)}; with the body masked out accuracy {masked['accuracy']:.3f} "
            f"(majority class {masked['majority_share']:.3f}); macro-F1 by orientation: {orientation}")


def shortcut_metrics(audit: dict) -> dict:
    """The flat numbers of ``metrics.json``."""
    return {"beats_acquisition_baselines": audit["beats_acquisition_baselines"],
            "acquisition_baseline_macro_f1": {n: b["macro_f1"] for n, b in audit["acquisition_baselines"].items()},
            "macro_f1_minus_acquisition_baseline_low": {n: b["model_minus_baseline"]["low"]
                                                        for n, b in audit["acquisition_baselines"].items()},
            "masked_body_accuracy": audit["masked_body"]["accuracy"],
            "majority_share": audit["masked_body"]["majority_share"],
            "by_orientation": {o: {"n": s["n"], "macro_f1": s["macro_f1"], "critical_recall": s["critical_recall"]}
                               for o, s in audit["by_orientation"].items()}}
