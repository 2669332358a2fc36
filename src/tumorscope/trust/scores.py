"""How far the trust machinery can be trusted, measured on the test split: calibration before and
after temperature scaling, empirical coverage of the prediction sets overall and per class, set
sizes, the share referred and the accuracy on what is not referred (selective accuracy), each
interval from a bootstrap over duplicate groups (as the rest of the evaluation)."""

from __future__ import annotations

import numpy as np

from tumorscope.models.evaluate import expected_calibration_error, group_draw_weights
from tumorscope.trust.calibration import log_probabilities


def _interval(values: np.ndarray, confidence: float) -> dict:
    values = values[~np.isnan(values)]
    if not len(values):
        return {"low": None, "high": None}
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return {"low": float(low), "high": float(high)}


class GroupBootstrap:
    """Resampled slice weights: each of B draws takes G groups with replacement; a slice weighs as
    often as its group was drawn. A share over slices is then a ratio of weighted sums."""

    def __init__(self, groups: np.ndarray, n_samples: int, confidence: float, seed: int):
        _, index = np.unique(np.asarray(groups), return_inverse=True)
        n_groups = int(index.max()) + 1 if len(index) else 0
        self.weights = group_draw_weights(n_groups, n_samples, seed)[:, index].astype(np.float64)  # (B, N)
        self.confidence = confidence

    def share(self, hits: np.ndarray, among: np.ndarray | None = None) -> dict:
        """Point share of ``hits`` among the slices in ``among`` (all by default), with its interval."""
        hits = np.asarray(hits, dtype=np.float64)
        among = np.ones(len(hits), bool) if among is None else np.asarray(among, bool)
        point = float(hits[among].mean()) if among.any() else None
        numerator = self.weights @ (hits * among)
        denominator = self.weights @ among.astype(np.float64)
        ratio = np.divide(numerator, denominator, out=np.full(len(numerator), np.nan), where=denominator > 0)
        return {"value": point} | _interval(ratio, self.confidence)

    def mean(self, values: np.ndarray) -> dict:
        return self.share(values)

    def ece(self, labels: np.ndarray, probabilities: np.ndarray, n_bins: int) -> dict:
        point, _ = expected_calibration_error(labels, probabilities, n_bins)
        confidence = probabilities.max(axis=1)
        gap = (probabilities.argmax(axis=1) == labels).astype(np.float64) - confidence
        edges = np.linspace(0.0, 1.0, n_bins + 1)
        which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
        members = np.eye(n_bins)[which]                     # (N, bins)
        per_bin = self.weights @ (members * gap[:, None])   # (B, bins) weighted sums of accuracy - confidence
        total = self.weights.sum(axis=1)
        resampled = np.divide(np.abs(per_bin).sum(axis=1), total, out=np.full(len(total), np.nan), where=total > 0)
        return {"value": float(point)} | _interval(resampled, self.confidence)


def risk_coverage(labels: np.ndarray, probabilities: np.ndarray) -> list[dict]:
    """Error among the most confident k slices for every k: what a team gets by deciding only the
    answers it is surest of (the rest go to a radiologist)."""
    order = np.argsort(-probabilities.max(axis=1), kind="stable")
    wrong = (probabilities.argmax(axis=1) != labels)[order]
    kept = np.arange(1, len(order) + 1)
    errors = np.cumsum(wrong) / kept
    return [{"coverage": float(k / len(order)), "risk": float(e)} for k, e in zip(kept, errors, strict=True)]


def trust_scores(labels: np.ndarray, raw: np.ndarray, judged, groups: np.ndarray, classes: list[str], state: dict,
                 evaluate_cfg, seed: int) -> dict:
    """The trust section of the evaluation report (``judged``: ``trust.answers.judge``'s result)."""
    labels = np.asarray(labels, dtype=np.int64)
    bootstrap = GroupBootstrap(groups, evaluate_cfg.bootstrap_samples, evaluate_cfg.confidence, seed)
    rows = np.arange(len(labels))
    covered = judged.sets[rows, labels]
    refer = judged.refer
    correct = judged.probabilities.argmax(axis=1) == labels
    set_size = judged.sets.sum(axis=1)
    reasons = [r for r in judged.reasons if r is not None]
    return {
        "calibration": {
            "temperature": state["temperature"],
            "ece_before": bootstrap.ece(labels, raw, evaluate_cfg.calibration_bins),
            "ece_after": bootstrap.ece(labels, judged.probabilities, evaluate_cfg.calibration_bins),
            "nll_before": bootstrap.mean(-log_probabilities(raw)[rows, labels]),
            "nll_after": bootstrap.mean(-log_probabilities(judged.probabilities)[rows, labels]),
            "reliability_after": expected_calibration_error(labels, judged.probabilities,
                                                            evaluate_cfg.calibration_bins)[1],
        },
        "conformal": {
            "alpha": state["conformal"]["alpha"], "score": state["conformal"]["score"],
            "class_conditional": state["conformal"]["class_conditional"],
            "target_coverage": 1 - state["conformal"]["alpha"],
            "coverage": bootstrap.share(covered),
            "coverage_per_class": {c: bootstrap.share(covered, labels == k) for k, c in enumerate(classes)
                                   if (labels == k).any()},
            "mean_set_size": float(set_size.mean()) if len(labels) else None,
            "set_size_share": {str(size): float(np.mean(set_size == size)) for size in range(len(classes) + 1)},
        },
        "referral": {
            "referred": bootstrap.share(refer),
            "referred_because": {
                "input": sum(r.startswith(("blank", "intensity")) for r in reasons),
                "features": sum(r.startswith("unlike the training") for r in reasons),
                "prediction_set": sum(r.startswith(("no class", "the model cannot tell")) for r in reasons),
            },
            "selective_accuracy": bootstrap.share(correct, ~refer),
            "accuracy_all": bootstrap.share(correct),
            "ood_distance_threshold": state["ood"]["distance_threshold"],
        },
    }
