"""Is the model still right? Accuracy measured on radiologists' readings of queued answers.

The service queues every referred answer and a random ``review.sample_rate`` of the decided ones
(``api.review_intake``). So the readings of the sampled items estimate the accuracy of decided
answers without bias, and, each weighted by 1 / sample_rate beside the referred ones (weight 1),
the accuracy and the critical class's recall over all answers. The recall is compared with the
champion's test recall by a one-sided binomial test on the effective number of reviewed slices of
that class (Kish's n_eff = (sum w)^2 / sum w^2, which the weights shrink): a recall significantly
below the test figure raises the alert. Readings of ``cannot assess`` are left out and counted.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

OK, ALERT, INSUFFICIENT = "ok", "alert", "insufficient_readings"


def _weighted(pairs: list[tuple[bool, float]]) -> tuple[float | None, float]:
    """(weighted mean of the booleans, Kish's effective sample size) of (value, weight) pairs."""
    total = sum(w for _, w in pairs)
    if not pairs or total <= 0:
        return None, 0.0
    mean = sum(w for ok, w in pairs if ok) / total
    return mean, total ** 2 / sum(w * w for _, w in pairs)


def reviewed_accuracy(items: Iterable[Any], sample_rate: float, critical_class: str, champion_recall: float | None,
                      alpha: float = 0.05, min_readings: int = 20, model_version: str | None = None) -> dict[str, Any]:
    """The accuracy summary of the read items (``review.queue.Item``) of ``model_version`` (all
    versions when None)."""
    from scipy.stats import binom

    read, cannot, other_versions = [], 0, 0
    for item in items:
        if item.label is None:
            continue
        if model_version is not None and item.record["model_version"] != model_version:
            other_versions += 1
            continue
        if item.label not in item.record["classes"]:
            cannot += 1
            continue
        weight = 1.0 if item.record["why"] == "referred" else 1.0 / max(sample_rate, 1e-9)
        read.append((item.record["why"], item.record["answer"].get("class"), item.label, weight))
    decided = [(predicted == truth, 1.0) for why, predicted, truth, _ in read if why == "sampled"]
    referred = [(predicted == truth, 1.0) for why, predicted, truth, _ in read if why == "referred"]
    classes = sorted({truth for *_, truth, _ in read})
    recall_decided = {c: _weighted([(p == t, 1.0) for why, p, t, _ in read if why == "sampled" and t == c])[0]
                      for c in classes}
    overall, n_eff = _weighted([(p == t, w) for _, p, t, w in read])
    critical, critical_n = _weighted([(p == t, w) for _, p, t, w in read if t == critical_class])
    summary: dict[str, Any] = {
        "model_version": model_version, "n_read": len(read), "n_cannot_assess": cannot,
        "n_other_versions": other_versions, "sample_rate": sample_rate,
        "decided": {"n": len(decided), "accuracy": _weighted(decided)[0], "recall": recall_decided},
        "referred": {"n": len(referred), "model_right": _weighted(referred)[0]},
        "all_answers": {"accuracy": overall, "n_effective": n_eff},
        "critical": {"class": critical_class, "recall": critical, "n_effective": critical_n,
                     "champion_test_recall": champion_recall, "p_value": None, "alpha": alpha},
    }
    if critical is None or critical_n < min_readings or champion_recall is None:
        why = ("no champion test recall to compare with" if champion_recall is None and critical is not None
               and critical_n >= min_readings else
               f"{critical_n:.1f} effective reviewed {critical_class} slices (< review.min_readings {min_readings})")
        return summary | {"status": INSUFFICIENT, "alert": False, "reason": why}
    n = max(1, round(critical_n))
    k = math.floor(critical * n + 1e-9)
    p_value = float(binom.cdf(k, n, champion_recall))
    summary["critical"]["p_value"] = p_value
    fell = p_value < alpha
    reason = (f"{critical_class} recall on reviewed answers {critical:.2f} (n_eff {critical_n:.1f}) "
              f"{'is below' if fell else 'is not significantly below'} the champion's test recall "
              f"{champion_recall:.2f} (one-sided binomial p = {p_value:.3g}, alpha {alpha:g})")
    return summary | {"status": ALERT if fell else OK, "alert": fell, "reason": reason}


def readings_frame(items: Iterable[Any], model_version: str | None = None):
    """(reading, the model's answer) of every read item of ``model_version`` whose reading is a class."""
    import pandas as pd

    rows = [{"target": item.label, "prediction": item.record["answer"].get("class"), "why": item.record["why"]}
            for item in items if item.label is not None and item.label in item.record["classes"]
            and (model_version is None or item.record["model_version"] == model_version)]
    return pd.DataFrame(rows, columns=["target", "prediction", "why"])


# Evidently 0.7.x takes two classes for a binary task and fails on its positive label (KeyError 1).
MIN_REPORT_CLASSES = 3


def classification_report(frame):
    """Evidently's classification report (accuracy, per-class precision and recall, the confusion
    matrix) of the readings against the model's answers; None when the readings and answers hold
    fewer than ``MIN_REPORT_CLASSES`` classes (the summary says so)."""
    if len(set(frame["target"]) | set(frame["prediction"])) < MIN_REPORT_CLASSES:
        return None
    from evidently import DataDefinition, Dataset, MulticlassClassification, Report
    from evidently.presets import ClassificationPreset

    definition = DataDefinition(classification=[MulticlassClassification(target="target", prediction_labels="prediction")],
                                categorical_columns=["target", "prediction", "why"])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scikit-learn: precision of a class never predicted is 0
        return Report([ClassificationPreset()]).run(Dataset.from_pandas(frame, data_definition=definition), None)
