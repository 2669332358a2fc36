"""How far the trust machinery can be trusted, measured on the test split: calibration before and
after temperature scaling, empirical coverage of the prediction sets overall and per class, set
sizes, the share referred and the accuracy on what is not referred (selective accuracy), each
interval from a bootstrap over duplicate groups (as the rest of the evaluation)."""

from __future__ import annotations

import numpy as np

from tumorscope.models.evaluate import expected_calibration_error, group_draw_weights
from tumorscope.trust.answers import ORIENTATION_REASON
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

    def mean(self, values: np.ndarray, among: np.ndarray | None = None) -> dict:
        """Point mean of ``values`` over the slices in ``among`` (all by default), with its
        interval; of 0/1 hits it is a share."""
        values = np.asarray(values, dtype=np.float64)
        among = np.ones(len(values), bool) if among is None else np.asarray(among, bool)
        point = float(values[among].mean()) if among.any() else None
        numerator = self.weights @ (values * among)
        denominator = self.weights @ among.astype(np.float64)
        ratio = np.divide(numerator, denominator, out=np.full(len(numerator), np.nan), where=denominator > 0)
        return {"value": point} | _interval(ratio, self.confidence)

    def ece(self, labels: np.ndarray, probabilities: np.ndarray, n_bins: int) -> tuple[dict, dict]:
        """(ECE with its interval, the reliability table of the point estimate)."""
        point, table = expected_calibration_error(labels, probabilities, n_bins)
        confidence = probabilities.max(axis=1)
        gap = (probabilities.argmax(axis=1) == labels).astype(np.float64) - confidence
        edges = np.linspace(0.0, 1.0, n_bins + 1)
        which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
        members = np.eye(n_bins)[which]                     # (N, bins)
        per_bin = self.weights @ (members * gap[:, None])   # (B, bins) weighted sums of accuracy - confidence
        total = self.weights.sum(axis=1)
        resampled = np.divide(np.abs(per_bin).sum(axis=1), total, out=np.full(len(total), np.nan), where=total > 0)
        return {"value": float(point)} | _interval(resampled, self.confidence), table


def risk_coverage(labels: np.ndarray, probabilities: np.ndarray) -> list[dict]:
    """Error among the most confident k slices for every k: what a team gets by deciding only the
    answers it is surest of (the rest go to a radiologist)."""
    order = np.argsort(-probabilities.max(axis=1), kind="stable")
    wrong = (probabilities.argmax(axis=1) != labels)[order]
    kept = np.arange(1, len(order) + 1)
    errors = np.cumsum(wrong) / kept
    return [{"coverage": float(k / len(order)), "risk": float(e)} for k, e in zip(kept, errors, strict=True)]


def coverage_at_accuracy(labels: np.ndarray, probabilities: np.ndarray, target_accuracy: float = 0.9,
                         points: int = 10) -> dict:
    """``risk_coverage`` in short: the accuracy of what is decided at ``points`` shares decided, and
    the largest share whose decided answers reach ``target_accuracy``. That confidence threshold is
    chosen on these same slices: the share is what the best threshold could decide here, an upper
    bound for one fixed in advance."""
    curve = risk_coverage(np.asarray(labels), probabilities)
    n = len(curve)
    if n == 0:
        return {"n": 0, "curve": [], "target_accuracy": target_accuracy, "max_coverage_at_target": None}
    picked = sorted({max(1, round(n * q / points)) for q in range(1, points + 1)})
    reached = [p["coverage"] for p in curve if 1.0 - p["risk"] >= target_accuracy]
    return {"n": n, "target_accuracy": target_accuracy,
            "curve": [{"coverage": curve[k - 1]["coverage"], "accuracy": 1.0 - curve[k - 1]["risk"]} for k in picked],
            "max_coverage_at_target": max(reached) if reached else 0.0}


def trust_scores(labels: np.ndarray, raw: np.ndarray, judged, groups: np.ndarray, classes: list[str], state: dict,
                 evaluate_cfg, seed: int) -> dict:
    """The trust section of the evaluation report (``judged``: ``trust.answers.judge``'s result)."""
    labels = np.asarray(labels, dtype=np.int64)
    bootstrap = GroupBootstrap(groups, evaluate_cfg.bootstrap_samples, evaluate_cfg.confidence, seed)
    rows = np.arange(len(labels))
    covered = judged.sets[rows, labels]
    set_size = judged.sets.sum(axis=1)
    ece_after, reliability_after = bootstrap.ece(labels, judged.probabilities, evaluate_cfg.calibration_bins)
    return {
        "calibration": {
            "temperature": state["temperature"],
            "ece_before": bootstrap.ece(labels, raw, evaluate_cfg.calibration_bins)[0],
            "ece_after": ece_after,
            "nll_before": bootstrap.mean(-log_probabilities(raw)[rows, labels]),
            "nll_after": bootstrap.mean(-log_probabilities(judged.probabilities)[rows, labels]),
            "reliability_after": reliability_after,
        },
        "conformal": {
            "alpha": state["conformal"]["alpha"], "score": state["conformal"]["score"],
            "class_conditional": state["conformal"]["class_conditional"],
            "target_coverage": 1 - state["conformal"]["alpha"],
            "coverage": bootstrap.mean(covered),
            "coverage_per_class": {c: bootstrap.mean(covered, labels == k) for k, c in enumerate(classes)
                                   if (labels == k).any()},
            "mean_set_size": float(set_size.mean()) if len(labels) else None,
            "set_size_share": {str(size): float(np.mean(set_size == size)) for size in range(len(classes) + 1)},
        },
        "referral": referral_scores(labels, judged, bootstrap) | {
            "ood_distance_threshold": state["ood"]["distance_threshold"]},
    }


def referral_scores(labels: np.ndarray, judged, bootstrap: GroupBootstrap) -> dict:
    """What the referral lets through: the share referred, why, and the accuracy of the answers it
    decides (``selective_accuracy``) against that of all of them."""
    refer = judged.refer
    correct = judged.probabilities.argmax(axis=1) == np.asarray(labels)
    reasons = [r for r in judged.reasons if r is not None]
    return {
        "referred": bootstrap.mean(refer),
        "referred_because": {
            "input": sum(r.startswith(("blank", "intensity")) for r in reasons),
            "features": sum(r.startswith("unlike the training") for r in reasons),
            "prediction_set": sum(r.startswith(("no class", "the model cannot tell")) for r in reasons),
            "orientation": sum(ORIENTATION_REASON in r for r in reasons),
        },
        "selective_accuracy": bootstrap.mean(correct, ~refer),
        "accuracy_all": bootstrap.mean(correct),
    }


def flat_trust_scores(trust: dict, prefix: str) -> dict[str, float]:
    """MLflow metrics of the trust section: calibration, coverage (overall, per class) with the
    interval lows, set size, referral and selective accuracy; undefined values left out."""
    values = {"ece_calibrated": trust["calibration"]["ece_after"]["value"],
              "nll_calibrated": trust["calibration"]["nll_after"]["value"],
              "temperature": trust["calibration"]["temperature"],
              "coverage": trust["conformal"]["coverage"]["value"],
              "coverage_ci_low": trust["conformal"]["coverage"]["low"],
              "mean_set_size": trust["conformal"]["mean_set_size"],
              "referred": trust["referral"]["referred"]["value"],
              "selective_accuracy": trust["referral"]["selective_accuracy"]["value"]}
    values |= {f"coverage_{c}": v["value"] for c, v in trust["conformal"]["coverage_per_class"].items()}
    return {f"{prefix}{name}": float(value) for name, value in values.items() if value is not None}


def trust_headline(trust: dict | None) -> dict:
    """Calibration, conformal coverage and referral as flat metrics (``trust.assessment.trust_scores``)."""
    if trust is None:
        return {}
    conformal, referral = trust["conformal"], trust["referral"]
    return {"ece_calibrated": trust["calibration"]["ece_after"]["value"],
            "temperature": trust["calibration"]["temperature"],
            "coverage": conformal["coverage"]["value"], "coverage_target": conformal["target_coverage"],
            "coverage_per_class": {c: v["value"] for c, v in conformal["coverage_per_class"].items()},
            "mean_set_size": conformal["mean_set_size"],
            "referred": referral["referred"]["value"], "selective_accuracy": referral["selective_accuracy"]["value"]}
