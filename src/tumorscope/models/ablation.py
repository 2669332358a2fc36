"""A paired ablation: named variants (param overrides) trained and tested on the same grouped folds,
so that differences between them are paired, and summarised with intervals from a bootstrap over
duplicate groups. Pure functions; the loop that trains is ``tumorscope.stages.ablation``.

Every variant tests every slice exactly once, in the fold the grouped k-fold put it in, by a model
that never saw its duplicate group. Differences to the baseline are computed slice by slice on the
same slices and resampled by the same group draws, so what the two variants share (easy series,
hard series) cancels and the interval is that of the difference.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np

from tumorscope.models.evaluate import group_confusions, group_draw_weights, macro_f1_from_confusion


def variant_fingerprint(overrides: dict, train_share: float, base: dict) -> str:
    """A short hash of what a variant is: its overrides, its share of training series and what every
    variant shares (the data, the folds, the seed). A stored fold whose fingerprint differs was
    computed for something else and is computed again."""
    text = json.dumps({"overrides": overrides, "train_share": train_share, "base": base}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def same_settings(stored: dict[str, Any], current: dict[str, Any], defaults: dict[str, Any]) -> bool:
    """Whether a fold trained with the flat params ``stored`` is what ``current`` would train: every
    stored setting unchanged, and every setting added since at its ``defaults`` value, the
    project's params before the variant's overrides (a new lever ships off in params.yaml, so the
    stored fold is what it would give). A changed project value is a changed setting."""
    return (all(key in current and current[key] == value for key, value in stored.items())
            and all(key in defaults and value == defaults[key] for key, value in current.items() if key not in stored))


def training_subsample(train_mask: np.ndarray, groups: np.ndarray, share: float, seed: int, fold: int) -> np.ndarray:
    """``train_mask`` with only ``share`` of its duplicate groups (about one scan series each) kept,
    drawn by (seed, fold): the same series for every variant of that fold; all of them at share 1."""
    if share >= 1.0:
        return train_mask
    series = np.unique(groups[train_mask])
    keep = max(1, int(round(share * len(series))))
    chosen = np.random.default_rng([seed, fold]).choice(series, keep, replace=False)
    return train_mask & np.isin(groups, chosen)


def _recall(matrices: np.ndarray, k: int) -> np.ndarray:
    support = matrices[:, k, :].sum(axis=1)
    return np.divide(matrices[:, k, k], support, out=np.full(len(support), np.nan), where=support > 0)


def paired_differences(labels: np.ndarray, predicted: np.ndarray, baseline: np.ndarray, groups: np.ndarray,
                       n_classes: int, critical: int | None, n_samples: int, confidence: float, seed: int) -> dict:
    """Macro-F1 and critical-class recall of a variant minus the baseline on the same slices, each
    with the interval of a paired bootstrap over duplicate groups (the same groups drawn for both)."""
    a = group_confusions(labels, predicted, groups, n_classes)
    b = group_confusions(labels, baseline, groups, n_classes)
    weights = group_draw_weights(len(a), n_samples, seed)
    resampled_a, resampled_b = np.tensordot(weights, a, axes=(1, 0)), np.tensordot(weights, b, axes=(1, 0))
    total_a, total_b = a.sum(axis=0)[None], b.sum(axis=0)[None]
    tail = (1 - confidence) / 2 * 100

    def interval(point: float, resampled: np.ndarray) -> dict:
        resampled = resampled[~np.isnan(resampled)]
        if not len(resampled) or np.isnan(point):
            return {"value": None, "low": None, "high": None}
        low, high = np.percentile(resampled, [tail, 100 - tail])
        return {"value": float(point), "low": float(low), "high": float(high)}

    result = {"macro_f1": interval(float(macro_f1_from_confusion(total_a)[0] - macro_f1_from_confusion(total_b)[0]),
                                   macro_f1_from_confusion(resampled_a) - macro_f1_from_confusion(resampled_b))}
    if critical is not None:
        result["critical_recall"] = interval(float(_recall(total_a, critical)[0] - _recall(total_b, critical)[0]),
                                             _recall(resampled_a, critical) - _recall(resampled_b, critical))
    return result


def verdict(difference: dict) -> str:
    """'better', 'worse' or 'no clear difference': whether the paired interval excludes 0."""
    if difference.get("low") is None:
        return "undefined"
    if difference["low"] > 0:
        return "better"
    if difference["high"] < 0:
        return "worse"
    return "no clear difference"


def _cell(summary: dict | None) -> str:
    if not summary or summary.get("value") is None:
        return "-"
    if summary.get("low") is None:
        return f"{summary['value']:.3f}"
    return f"{summary['value']:.3f} [{summary['low']:.3f}, {summary['high']:.3f}]"


def _signed(summary: dict | None) -> str:
    if not summary or summary.get("value") is None:
        return "-"
    return f"{summary['value']:+.3f} [{summary['low']:+.3f}, {summary['high']:+.3f}]"


def markdown_table(report: dict[str, Any]) -> str:
    """The ablation as a Markdown table: one row per variant, the baseline first. With another
    export (``cross_source``), its columns come first and the verdict follows them."""
    critical = report["critical_class"]
    cross = bool(report.get("cross_source"))
    head = ("| variant | overrides | training series | "
            + (f"cross-export macro-F1 [95 %] | cross-export {critical} recall [95 %] | cross-export ECE | "
               "cross-export share decided at 90 % accuracy (at best) | "
               "cross-export macro-F1 - baseline [95 %] | " if cross else "")
            + f"macro-F1 [95 %] | {critical} recall [95 %] | ECE | "
            f"macro-F1 - baseline [95 %] | {critical} recall - baseline [95 %] | verdict | "
            + ("in-source verdict | " if cross else "") + "minutes | cache MB |")
    rows = [head, "|---|---|---:|" + ("---|---|---:|---:|---|" if cross else "") + "---|---|---:|---|---|---|"
            + ("---|" if cross else "") + "---:|---:|"]
    for name, variant in report["variants"].items():
        overrides = json.dumps(variant["overrides"], sort_keys=True) if variant["overrides"] else "(defaults)"
        difference = variant.get("difference") or {}
        cells = [name, f"`{overrides}`", f"{variant['train_share']:.0%}"]
        if cross:
            scores = variant.get("cross_scores") or {}
            ece = scores.get("ece")
            decided = (scores.get("risk_coverage") or {}).get("max_coverage_at_target")
            cells += [_cell(scores.get("macro_f1")), _cell(scores.get("critical_recall")),
                      "-" if ece is None else f"{ece:.3f}", "-" if decided is None else f"{decided:.0%}",
                      _signed((variant.get("cross_difference") or {}).get("macro_f1"))]
        ece = variant["scores"].get("ece")
        cells += [_cell(variant["scores"]["macro_f1"]), _cell(variant["scores"].get("critical_recall")),
                  "-" if ece is None else f"{ece:.3f}", _signed(difference.get("macro_f1")),
                  _signed(difference.get("critical_recall")), variant.get("verdict", "baseline")]
        if cross:
            cells.append(variant.get("in_source_verdict", "baseline"))
        cache = "-" if variant.get("cache_mb") is None else str(variant["cache_mb"])
        if variant.get("feature_cache_mb") is not None:
            cache += f" + {variant['feature_cache_mb']} features"
        cells += [f"{variant['seconds'] / 60:.1f}", cache]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"
