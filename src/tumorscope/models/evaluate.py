"""Evaluation metrics and plots. Pure functions on (labels, probabilities); plots are Agg PNGs."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def confusion(labels: np.ndarray, predicted: np.ndarray, n_classes: int) -> np.ndarray:
    """Rows are true classes, columns predicted classes."""
    matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(matrix, (labels, predicted), 1)
    return matrix


def class_index(classes: list[str], name: str) -> int | None:
    """Index of ``name`` among the classes, None when the data has no such class."""
    return classes.index(name) if name in classes else None


def per_class_scores(matrix: np.ndarray) -> dict[str, np.ndarray]:
    """Precision, recall, F1 and support per class; 0 where undefined (no predictions/support)."""
    true_positive = np.diag(matrix).astype(float)
    predicted = matrix.sum(axis=0).astype(float)
    support = matrix.sum(axis=1).astype(float)
    precision = np.divide(true_positive, predicted, out=np.zeros_like(true_positive), where=predicted > 0)
    recall = np.divide(true_positive, support, out=np.zeros_like(true_positive), where=support > 0)
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(true_positive), where=denominator > 0)
    return {"precision": precision, "recall": recall, "f1": f1, "support": support}


def expected_calibration_error(labels: np.ndarray, probabilities: np.ndarray, n_bins: int) -> tuple[float, dict]:
    """ECE of the top-class confidence over equal-width bins, and the reliability diagram's data."""
    confidence = probabilities.max(axis=1)
    correct = (probabilities.argmax(axis=1) == labels).astype(float)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # Bin i holds confidences in (edges[i], edges[i+1]]; confidence 0 cannot occur with softmax.
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    ece = 0.0
    bins = {"lower": edges[:-1].tolist(), "upper": edges[1:].tolist(), "count": [], "accuracy": [], "confidence": []}
    for b in range(n_bins):
        members = which == b
        count = int(members.sum())
        bins["count"].append(count)
        if count == 0:
            bins["accuracy"].append(None)
            bins["confidence"].append(None)
            continue
        accuracy, mean_confidence = float(correct[members].mean()), float(confidence[members].mean())
        bins["accuracy"].append(accuracy)
        bins["confidence"].append(mean_confidence)
        ece += count / len(labels) * abs(accuracy - mean_confidence)
    return float(ece), bins


def one_vs_rest_auc(labels: np.ndarray, probabilities: np.ndarray) -> list[float | None]:
    """ROC-AUC of each class against the rest; None where the test set lacks positives or negatives."""
    from sklearn.metrics import roc_auc_score

    scores: list[float | None] = []
    for c in range(probabilities.shape[1]):
        positive = labels == c
        if positive.all() or not positive.any():
            scores.append(None)
        else:
            scores.append(float(roc_auc_score(positive, probabilities[:, c])))
    return scores


def degenerate_predictions(labels: np.ndarray, predicted: np.ndarray, max_share: float) -> str | None:
    """Explain why predictions look collapsed to one class, or None if they do not."""
    if len(predicted) == 0:
        return None
    top_share = np.bincount(predicted).max() / len(predicted)
    true_share = np.bincount(labels).max() / len(labels)
    if top_share > max_share and true_share <= max_share:
        top = int(np.bincount(predicted).argmax())
        return (f"inference-mode predictions are {top_share:.0%} class index {top} while the largest "
                f"true class is {true_share:.0%}: the model is degenerate (check normalisation statistics)")
    return None


def score_predictions(labels: np.ndarray, probabilities: np.ndarray, groups: np.ndarray, classes: list[str],
                      cfg, seed: int) -> dict:
    """The one scoring of a model's predictions on a set of slices: validation after training, a
    tuning trial, a cross-validation fold and the test split all get these fields, with these types.

    Point scores, their group-bootstrap intervals (whole duplicate groups resampled), calibration,
    one-vs-rest ROC-AUC, the confusion matrix and a guard against predictions collapsed to one
    class. ``cfg`` is the evaluate section of params (``tumorscope.config.EvaluateConfig``). A class
    without a slice in this set has no recall (None, not 0: "every tumour missed" would be false).
    """
    labels = np.asarray(labels)
    probabilities = np.asarray(probabilities)
    predicted = probabilities.argmax(axis=1)
    matrix = confusion(labels, predicted, len(classes))
    per_class = per_class_scores(matrix)
    present = per_class["support"] > 0
    ece, reliability = expected_calibration_error(labels, probabilities, cfg.calibration_bins)
    auc = one_vs_rest_auc(labels, probabilities)
    defined_auc = [a for a in auc if a is not None]
    interval = group_bootstrap(labels, predicted, groups, len(classes), cfg.bootstrap_samples, cfg.confidence, seed)
    critical = class_index(classes, cfg.critical_class)
    if critical is not None and not present[critical]:
        critical = None  # no such slice to miss here (a cross-validation fold can lack a class)
    degenerate = degenerate_predictions(labels, predicted, cfg.max_single_class_share)
    return {
        "n": int(len(labels)),
        "n_groups": interval["n_groups"],
        "accuracy": float((predicted == labels).mean()) if len(labels) else None,
        "macro_f1": float(macro_f1_from_confusion(matrix[None])[0]),
        "macro_f1_ci": interval["macro_f1"],
        "critical_class": cfg.critical_class if critical is not None else None,
        "critical_recall": float(per_class["recall"][critical]) if critical is not None else None,
        "critical_recall_ci": interval["recall"][critical] if critical is not None else None,
        "recall": {c: float(per_class["recall"][i]) for i, c in enumerate(classes) if present[i]},
        "recall_ci": {c: interval["recall"][i] for i, c in enumerate(classes) if present[i]},
        "macro_roc_auc_ovr": float(np.mean(defined_auc)) if defined_auc else None,
        "ece": ece if len(labels) else None,
        "degenerate": degenerate is not None,
        "degenerate_reason": degenerate or "",
        "per_class": {
            c: {"precision": float(per_class["precision"][i]),
                "recall": float(per_class["recall"][i]) if present[i] else None,
                "f1": float(per_class["f1"][i]), "support": int(per_class["support"][i]), "roc_auc_ovr": auc[i]}
            for i, c in enumerate(classes)
        },
        "prediction_share": {c: float(np.mean(predicted == i)) if len(predicted) else 0.0
                             for i, c in enumerate(classes)},
        "confusion_matrix": matrix.tolist(),
        "reliability": reliability,
        "bootstrap": {"n_samples": interval["n_samples"], "confidence": interval["confidence"]},
    }


# The part of a score a leaderboard row, a fold summary or an Optuna trial keeps (no matrices).
SUMMARY_FIELDS = ("n", "n_groups", "accuracy", "macro_f1", "macro_f1_ci", "critical_class", "critical_recall",
                  "critical_recall_ci", "recall", "ece", "degenerate", "degenerate_reason")


def summary_scores(scores: dict) -> dict:
    """The compact view of ``score_predictions``'s result: same names, same types."""
    return {key: scores[key] for key in SUMMARY_FIELDS}


def flat_scores(scores: dict, prefix: str) -> dict[str, float]:
    """MLflow metrics of a score (``prefix`` names the set: val_, test_, ...); undefined values
    (a class absent from the set, an interval over too few groups) are left out, not logged as 0."""
    flat: dict[str, float] = {}

    def put(name: str, value) -> None:
        if value is not None:
            flat[f"{prefix}{name}"] = float(value)

    for name in ("accuracy", "macro_f1", "critical_recall", "ece", "macro_roc_auc_ovr"):
        put(name, scores.get(name))
    for name in ("macro_f1", "critical_recall"):
        interval = scores.get(f"{name}_ci") or {}
        put(f"{name}_ci_low", interval.get("low"))
        put(f"{name}_ci_high", interval.get("high"))
    for label, value in scores["recall"].items():
        put(f"recall_{label}", value)
    put("degenerate", int(bool(scores["degenerate"])))
    return flat


def headline_metrics(scores: dict) -> dict:
    """The flat subset of a test score that DVC shows and diffs: overall scores, their intervals
    as scalars (so that `dvc metrics show/diff` lists them) and per-class recall (a missed tumour
    is the costly error)."""
    interval = scores["macro_f1_ci"]
    return {"n_test": scores["n"], "accuracy": scores["accuracy"], "macro_f1": scores["macro_f1"],
            "macro_roc_auc_ovr": scores["macro_roc_auc_ovr"], "ece": scores["ece"], "degenerate": scores["degenerate"],
            "recall": scores["recall"],
            "macro_f1_ci": {"low": interval["low"], "high": interval["high"]},
            "recall_ci_low": {c: r["low"] for c, r in scores["recall_ci"].items()}}


def macro_f1_from_confusion(matrices: np.ndarray) -> np.ndarray:
    """Macro-F1 of each confusion matrix in a (B, K, K) stack, over the classes present in the
    truth of that matrix, as compute_metrics averages."""
    true_positive = np.diagonal(matrices, axis1=1, axis2=2).astype(float)
    support = matrices.sum(axis=2).astype(float)
    predicted = matrices.sum(axis=1).astype(float)
    denominator = support + predicted
    f1 = np.divide(2 * true_positive, denominator, out=np.zeros_like(true_positive), where=denominator > 0)
    occurs = support > 0
    return (f1 * occurs).sum(axis=1) / np.maximum(occurs.sum(axis=1), 1)


def group_confusions(labels: np.ndarray, predicted: np.ndarray, groups: np.ndarray, n_classes: int) -> np.ndarray:
    """One confusion matrix per duplicate group, (G, K, K) in the order of ``np.unique(groups)``."""
    _, group_index = np.unique(groups, return_inverse=True)
    per_group = np.zeros((int(group_index.max()) + 1 if len(group_index) else 0, n_classes, n_classes), dtype=np.int64)
    np.add.at(per_group, (group_index, np.asarray(labels), np.asarray(predicted)), 1)
    return per_group


def group_draw_weights(n_groups: int, n_samples: int, seed: int) -> np.ndarray:
    """(B, G) bootstrap weights: how often each of G groups is drawn in each of B resamples."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_groups, size=(n_samples, n_groups))
    return np.stack([np.bincount(d, minlength=n_groups) for d in draws]) if n_groups else np.zeros((n_samples, 0), int)


def paired_group_bootstrap(labels: np.ndarray, predicted_a: np.ndarray, predicted_b: np.ndarray, groups: np.ndarray,
                           n_classes: int, n_samples: int, confidence: float, seed: int) -> dict:
    """Macro-F1 of model A minus model B on the same slices, with a paired bootstrap over duplicate
    groups: each resample draws the same groups for both models, so the interval is that of the
    *difference* (the models' shared easy and hard slices cancel). ``p_not_better`` is the share of
    resamples in which A is not better than B (a one-sided bootstrap p-value for "A beats B")."""
    a = group_confusions(labels, predicted_a, groups, n_classes)
    b = group_confusions(labels, predicted_b, groups, n_classes)
    weights = group_draw_weights(len(a), n_samples, seed)
    difference = (macro_f1_from_confusion(np.tensordot(weights, a, axes=(1, 0)))
                  - macro_f1_from_confusion(np.tensordot(weights, b, axes=(1, 0))))
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(difference, [tail, 100 - tail]) if len(a) else (0.0, 0.0)
    point = float(macro_f1_from_confusion(a.sum(axis=0)[None])[0] - macro_f1_from_confusion(b.sum(axis=0)[None])[0])
    return {"macro_f1_difference": point, "low": float(low), "high": float(high),
            "p_not_better": float(np.mean(difference <= 0)) if len(a) else 1.0,
            "n_groups": int(len(a)), "n_samples": n_samples, "confidence": confidence}


def mcnemar_exact(correct_a: np.ndarray, correct_b: np.ndarray) -> dict:
    """McNemar's exact test on paired per-image correctness: ``a_only`` slices only A gets right,
    ``b_only`` only B; the two-sided p-value of the binomial test on the discordant pairs. It treats
    slices as independent (near-duplicates are not), so it is reported beside the group bootstrap,
    not instead of it."""
    from scipy.stats import binomtest

    a_only = int(np.sum(correct_a & ~correct_b))
    b_only = int(np.sum(~correct_a & correct_b))
    p_value = float(binomtest(a_only, a_only + b_only, 0.5).pvalue) if a_only + b_only else 1.0
    return {"a_only": a_only, "b_only": b_only, "p_value": p_value}


def group_bootstrap(labels: np.ndarray, predicted: np.ndarray, groups: np.ndarray, n_classes: int,
                    n_samples: int, confidence: float, seed: int) -> dict:
    """Bootstrap intervals of macro-F1 and per-class recall that resample whole duplicate groups.

    Near-identical neighbouring slices are one piece of evidence, not many: resampling images
    would make a lucky split look certain. Each bootstrap draw picks len(groups) groups with
    replacement; per-group confusion matrices make a draw a weighted sum, so 1,000 draws are cheap.
    Returns mean and [low, high] percentile bounds.
    """
    per_group = group_confusions(labels, predicted, groups, n_classes)
    weights = group_draw_weights(len(per_group), n_samples, seed)
    matrices = np.tensordot(weights, per_group, axes=(1, 0))  # (B, K, K)
    support = matrices.sum(axis=2)
    recall = np.divide(np.diagonal(matrices, axis1=1, axis2=2), support,
                       out=np.full(support.shape, np.nan), where=support > 0)
    tail = (1 - confidence) / 2 * 100

    def summary(values: np.ndarray) -> dict:
        values = values[~np.isnan(values)]
        if not len(values):
            return {"mean": None, "low": None, "high": None}
        low, high = np.percentile(values, [tail, 100 - tail])
        return {"mean": float(values.mean()), "low": float(low), "high": float(high)}

    return {"n_groups": int(len(per_group)), "n_samples": n_samples, "confidence": confidence,
            "macro_f1": summary(macro_f1_from_confusion(matrices)),
            "recall": [summary(recall[:, c]) for c in range(n_classes)]}


def format_interval(interval: dict | None) -> str:
    """' [low, high]' of an interval, or '' when it is undefined."""
    return f" [{interval['low']:.3f}, {interval['high']:.3f}]" if interval and interval["low"] is not None else ""


def accuracy_by_distance(correct: np.ndarray, distances: np.ndarray, upper_edges: list[int]) -> list[dict]:
    """Accuracy in bands of distance to the nearest training slice (bands end at ``upper_edges``,
    the last band is open). A model that only recognises slices it has seen near-copies of scores
    high in the first band and falls away in the far ones: the split's honesty, made visible."""
    bands, low = [], 0
    for high in [*sorted(upper_edges), 64]:
        inside = (distances >= low) & (distances <= high)
        n = int(inside.sum())
        bands.append({"distance": f"{low}-{high}" if high < 64 else f">={low}", "n": n,
                      "accuracy": float(correct[inside].mean()) if n else None})
        low = high + 1
    return bands


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(matrix: np.ndarray, classes: list[str], path: Path) -> None:
    plt = _figure()
    fig, ax = plt.subplots(figsize=(4.8, 4.2), dpi=120)
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=30)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    peak = matrix.max() if matrix.size else 0
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(j, i, str(value), ha="center", va="center", color="white" if value > peak / 2 else "black")
    ax.set_title("Confusion matrix (test)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_class_histogram(labels: np.ndarray, predicted: np.ndarray, classes: list[str], path: Path) -> None:
    plt = _figure()
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    positions = np.arange(len(classes))
    ax.bar(positions - 0.2, np.bincount(labels, minlength=len(classes)), 0.4, label="true")
    ax.bar(positions + 0.2, np.bincount(predicted, minlength=len(classes)), 0.4, label="predicted")
    ax.set_xticks(positions, classes)
    ax.set_ylabel("test images")
    ax.legend()
    ax.set_title("Class histogram (test)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_reliability(reliability: dict, ece: float, path: Path, title: str = "Reliability diagram") -> None:
    plt = _figure()
    fig, ax = plt.subplots(figsize=(4.2, 4.2), dpi=120)
    centres = [(lo + hi) / 2 for lo, hi in zip(reliability["lower"], reliability["upper"], strict=True)]
    width = reliability["upper"][0] - reliability["lower"][0]
    accuracy = [a if a is not None else 0.0 for a in reliability["accuracy"]]
    ax.bar(centres, accuracy, width=width * 0.9, edgecolor="black", label="accuracy")
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(f"{title} (ECE {ece:.3f})", fontsize=9)
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
