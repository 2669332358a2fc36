"""The promotion gates, as pure policy: what a challenger must show (absolute gates on its own test
scores, the paired comparison with the champion, not rolled back) and the one line that says why.
``registry`` does the MLflow calls; ``stages.promotion`` joins the two."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from tumorscope.config import PromoteConfig


@dataclass
class Gate:
    name: str
    passed: bool
    value: float | None
    threshold: float | None
    detail: str

    def line(self) -> str:
        verdict = "pass" if self.passed else "FAIL"
        return f"{self.name} {verdict} ({self.detail})"


def _at_least(name: str, value: float | None, minimum: float, what: str) -> Gate:
    if value is None:
        return Gate(name, minimum <= 0, None, minimum, f"{what} undefined on this test set, need >= {minimum:.3f}")
    return Gate(name, value >= minimum, value, minimum, f"{what} {value:.3f}, need >= {minimum:.3f}")


def coverage_gate(trust: dict | None, cfg: PromoteConfig) -> Gate:
    """The prediction sets must hold the true class about as often as promised on the test split."""
    if trust is None:
        return Gate("coverage", False, None, None, "no prediction sets were evaluated (retrain with this version)")
    conformal = trust["conformal"]
    need = conformal["target_coverage"] - cfg.coverage_tolerance
    return _at_least("coverage", conformal["coverage"]["value"], need,
                     f"prediction-set coverage (target {conformal['target_coverage']:.2f})")


def absolute_gates(scores: dict, cfg: PromoteConfig) -> list[Gate]:
    """Gates on the challenger's own test scores (``models.evaluate.score_predictions`` with the
    ``trust`` section of ``trust.assessment.trust_scores``): the calibration gate reads the ECE after
    temperature scaling, the probabilities every answer carries."""
    critical = scores.get("critical_class") or "critical class"
    trust = scores.get("trust")
    ece = trust["calibration"]["ece_after"]["value"] if trust else scores.get("ece")
    return [
        _at_least("macro_f1", (scores.get("macro_f1_ci") or {}).get("low"), cfg.min_macro_f1_low,
                  "macro-F1 interval low"),
        _at_least("critical_recall", (scores.get("critical_recall_ci") or {}).get("low"), cfg.min_critical_recall_low,
                  f"{critical} recall interval low"),
        Gate("calibration", ece is not None and ece <= cfg.max_ece, ece, cfg.max_ece,
             f"calibrated ECE {ece:.3f}, need <= {cfg.max_ece:.3f}" if ece is not None else "ECE undefined"),
        coverage_gate(trust, cfg),
        Gate("not_degenerate", not scores["degenerate"], None, None,
             scores["degenerate_reason"] or "predictions spread over classes"),
        *([acquisition_gate(scores.get("shortcuts"))] if cfg.require_beating_acquisition_baselines else []),
    ]


def acquisition_gate(shortcuts: dict | None) -> Gate:
    """The model must beat, on the same test slices, every baseline that sees only the acquisition
    (``models.shortcuts``): the lower end of each paired macro-F1 difference above 0."""
    if shortcuts is None:
        return Gate("beats_acquisition_baselines", False, None, 0.0,
                    "no acquisition-only baseline was evaluated (evaluate again with this version)")
    lows = {name: b["model_minus_baseline"]["low"] for name, b in shortcuts["acquisition_baselines"].items()}
    worst = min(lows, key=lambda name: lows[name])
    detail = ", ".join(f"{name} {low:+.3f}" for name, low in lows.items())
    return Gate("beats_acquisition_baselines", lows[worst] > 0, lows[worst], 0.0,
                f"macro-F1 minus acquisition-only baseline, interval low: {detail}; need > 0")


def comparison_gate(comparison: dict | None, cfg: PromoteConfig) -> Gate:
    """Challenger vs champion on the same slices (``models.evaluate.paired_group_bootstrap``);
    passes when there is no champion yet."""
    if comparison is None:
        return Gate("beats_champion", True, None, cfg.min_improvement, "no champion yet")
    low = comparison["low"]
    return Gate("beats_champion", low > cfg.min_improvement, low, cfg.min_improvement,
                f"macro-F1 difference {comparison['macro_f1_difference']:+.3f} "
                f"[{low:+.3f}, {comparison['high']:+.3f}] over {comparison['n_groups']} groups, "
                f"need low > {cfg.min_improvement:+.3f}; McNemar {comparison['mcnemar']['a_only']} vs "
                f"{comparison['mcnemar']['b_only']}, p={comparison['mcnemar']['p_value']:.3g}")


def readings_gate(on_readings: dict | None, cfg: PromoteConfig) -> Gate | None:
    """Challenger vs champion on the test slices radiologists read (``review harvest`` batches): a
    gate only when ``promote.min_improvement_on_readings`` is set; a few read slices give a wide
    interval, so by default the comparison is reported, not decided on."""
    minimum = cfg.min_improvement_on_readings
    if minimum is None:
        return None
    if on_readings is None or not on_readings.get("n_slices"):
        return Gate("beats_champion_on_readings", True, None, minimum, "no read slice in the test split")
    low = on_readings["low"]
    return Gate("beats_champion_on_readings", low > minimum, low, minimum,
                f"macro-F1 difference on {on_readings['n_slices']} read slices {on_readings['macro_f1_difference']:+.3f} "
                f"[{low:+.3f}, {on_readings['high']:+.3f}], need low > {minimum:+.3f}")


def rollback_gate(version) -> Gate:
    """A version a person rolled back is not promoted again by a rerun of the same model."""
    record = (version.tags or {}).get("rolled_back")
    if not record:
        return Gate("not_rolled_back", True, None, None, "never rolled back")
    rolled = json.loads(record)
    return Gate("not_rolled_back", False, None, None,
                f"rolled back by {rolled.get('by')} at {rolled.get('at')}: {rolled.get('reason')}")


def decision_line(version: str, promoted: bool, gates: list[Gate], champion: str | None) -> str:
    """The one line a promotion prints: the verdict, the failed gates first, then the others."""
    failed = [g for g in gates if not g.passed]
    verdict = (f"promote: {version} is the new champion" if promoted
               else f"promote: {version} refused ({', '.join(g.name for g in failed)})")
    against = f" against champion {champion}" if champion else ""
    return f"{verdict}{against}; " + "; ".join(g.line() for g in [*failed, *(g for g in gates if g.passed)])


def gates_record(gates: list[Gate]) -> list[dict]:
    return [asdict(g) for g in gates]
