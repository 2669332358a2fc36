"""Reference vs current window with Evidently 0.7: per-feature drift tests, embedding drift, one
verdict, an HTML report, a JSON summary and the report's history in an Evidently workspace.

The verdict: drift when the share of drifted features (image features, predicted class and
confidence) reaches ``drift_share``, or when the embeddings drift. A window smaller than
``min_window`` gets no verdict at all ("insufficient data"), never a guess.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tumorscope.config import MonitorConfig
from tumorscope.monitoring.features import EMBEDDING_PREFIX, IMAGE_FEATURES, PREDICTION_FEATURES

DRIFT, NO_DRIFT, INSUFFICIENT = "drift", "no_drift", "insufficient_data"
EMBEDDING_SET = "embedding"
DASHBOARD_PANELS: tuple[tuple[str, str, dict[str, str]], ...] = (
    ("Share of drifted features", "DriftedColumnsCount", {"value_type": "share"}),
                    ("Embedding drift score", "EmbeddingsDrift", {}))


@dataclass(frozen=True)
class DriftSettings:
    """The monitor.* settings a comparison uses (their values and meaning: params.yaml)."""

    drift_share: float
    min_window: int
    method: str | None
    threshold: float | None
    embedding_method: str
    embedding_threshold: float | None

    @classmethod
    def of(cls, monitor: MonitorConfig, **changes: Any) -> DriftSettings:
        """The settings of ``monitor`` (params.monitor), with ``changes`` (e.g. a smaller min_window)."""
        return cls(**({name: getattr(monitor, name) for name in cls.__dataclass_fields__} | changes))


@dataclass
class DriftResult:
    summary: dict[str, Any]
    snapshot: Any = None  # the Evidently snapshot (None when no report was computed)
    notes: list[str] = field(default_factory=list)


# Below this many slices on either side distances are mostly sampling noise: the normed Wasserstein
# distance of two samples of one distribution is about 0.8 * sqrt(1/n + 1/m), 0.11 at 120 vs 100
# slices, above its 0.1 threshold. There the K-S test, whose p-value knows the sample sizes, decides.
LARGE_WINDOW = 1000
# Per embedding component; the ratio method calls drift when more than 20% of components drift, and
# 0.01 keeps a same-distribution window's chance of 2 of 8 false component alarms near 0.3%.
COMPONENT_TESTS = {"ks": 0.01, "wasserstein": 0.1}


def numeric_test(settings: DriftSettings, n_reference: int, n_current: int) -> tuple[str, float | None]:
    """(stat test, threshold) for numeric features: the configured one, else chosen by window size."""
    if settings.method:
        return settings.method, settings.threshold
    return ("ks" if min(n_reference, n_current) < LARGE_WINDOW else "wasserstein"), settings.threshold


def embedding_method(name: str, threshold: float | None, component_test: str = "wasserstein"):
    """An Evidently embedding drift method; every one calls drift when its score exceeds its threshold
    (bootstrap off, so the threshold means the same at every window size)."""
    from evidently.metrics.embeddings import DistanceDriftMethod, MMDDriftMethod, ModelDriftMethod, RatioDriftMethod

    kinds = {"ratio": RatioDriftMethod, "distance": DistanceDriftMethod, "mmd": MMDDriftMethod, "model": ModelDriftMethod}
    options: dict[str, Any] = ({"component_stattest": component_test,
                                "component_stattest_threshold": COMPONENT_TESTS.get(component_test, 0.05)}
                               if name == "ratio" else {"bootstrap": False})
    if threshold is not None:
        options["threshold"] = threshold
    return kinds[name](**options)


def comparable_columns(reference: pd.DataFrame, current: pd.DataFrame) -> tuple[list[str], list[str], dict[str, Any]]:
    """(features for Evidently, embedding columns, features judged here). A feature missing or
    incomplete on either side (a log written by an older version) is left out with a note; a feature
    constant in the reference (every slice 512x512, 8 bits) is judged here: drifted when any current
    value differs, scored by the share that does (a distance test would divide by a zero spread)."""
    notes: dict[str, Any] = {}
    features, constant = [], {}
    for name in (*IMAGE_FEATURES, *PREDICTION_FEATURES):
        if name not in reference or name not in current or reference[name].isna().any() or current[name].isna().any():
            notes[name] = "missing in some rows: not compared"
            continue
        values = reference[name].unique()
        if len(values) == 1 and name != "predicted_class":
            share = float((current[name] != values[0]).mean())
            constant[name] = {"score": share, "method": f"constant in reference ({values[0]:g}): share of current rows that differ",
                              "threshold": 0.0, "drifted": share > 0.0}
            continue
        features.append(name)
    embeddings = [c for c in reference.columns if c.startswith(EMBEDDING_PREFIX) and c in current]
    return features, embeddings, {"constant": constant, "not_compared": notes}


def _class_shares(frame: pd.DataFrame) -> dict[str, float]:
    if "predicted_class" not in frame or frame.empty:
        return {}
    return {str(k): float(v) for k, v in frame["predicted_class"].value_counts(normalize=True).sort_index().items()}


def compare(reference: pd.DataFrame, current: pd.DataFrame, settings: DriftSettings) -> DriftResult:
    """Run the Evidently report and reduce it to one verdict with per-feature scores."""
    base = {"n_reference": int(len(reference)), "n_current": int(len(current)),
            "settings": settings.__dict__.copy(),
            "predicted_class_share": {"reference": _class_shares(reference), "current": _class_shares(current)}}
    if len(reference) < settings.min_window:
        return DriftResult(base | {"status": INSUFFICIENT, "drift": None,
                                   "reason": f"reference of {len(reference)} slices (< monitor.min_window={settings.min_window})"})
    if len(current) < settings.min_window:
        return DriftResult(base | {"status": INSUFFICIENT, "drift": None,
                                   "reason": f"current window of {len(current)} slices (< monitor.min_window={settings.min_window}): "
                                             "no verdict"})
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import EmbeddingsDrift
    from evidently.presets import DataDriftPreset

    features, embeddings, judged = comparable_columns(reference, current)
    numerical = [c for c in features if c != "predicted_class"] + embeddings
    categorical = [c for c in features if c == "predicted_class"]
    definition = DataDefinition(numerical_columns=numerical, categorical_columns=categorical,
                                embeddings={EMBEDDING_SET: embeddings} if embeddings else None)
    test, threshold = numeric_test(settings, len(reference), len(current))
    metrics: list[Any] = [DataDriftPreset(columns=features, drift_share=settings.drift_share, num_method=test,
                                          num_threshold=threshold, cat_method=settings.method, cat_threshold=settings.threshold)]
    method = embedding_method(settings.embedding_method, settings.embedding_threshold, test) if embeddings else None
    if method is not None:
        metrics.append(EmbeddingsDrift(embeddings_name=EMBEDDING_SET, drift_method=method))
    columns = features + embeddings
    # threadpoolctl comes with scikit-learn (Evidently's dependency); limit after Evidently's imports,
    # which load the OpenMP runtime it limits.
    from threadpoolctl import threadpool_limits

    with warnings.catch_warnings(), threadpool_limits(limits=1, user_api="openmp"):
        # Evidently's correlation widgets divide by the spread of near-constant columns (dead units
        # of an embedding): numpy warns, the drift tests are unaffected.
        # The embedding widget's t-SNE (scikit-learn, OpenMP) on 2 busy cores: its threads spun
        # against each other, 1-35 s per report instead of 0.4 s on one thread.
        warnings.simplefilter("ignore", RuntimeWarning)
        snapshot = Report(metrics, include_tests=True).run(
            Dataset.from_pandas(current[columns], data_definition=definition),
            Dataset.from_pandas(reference[columns], data_definition=definition))
    scores = feature_scores(snapshot)
    scores |= judged["constant"]
    drifted = sorted(name for name, s in scores.items() if s["drifted"])
    share = len(drifted) / len(scores) if scores else 0.0
    embedding = embedding_score(snapshot, method) if method is not None else None
    features_drift = bool(scores) and share >= settings.drift_share
    embedding_drift = bool(embedding and embedding["drifted"])
    drift = features_drift or embedding_drift
    reasons = []
    if features_drift:
        reasons.append(f"{len(drifted)}/{len(scores)} features drifted (>= {settings.drift_share:g}): {', '.join(drifted)}")
    if embedding_drift and embedding is not None:
        reasons.append(f"embeddings drifted ({embedding['method']} {embedding['score']:.3g} > {embedding['threshold']:g})")
    if not drift:
        reasons.append(f"{len(drifted)}/{len(scores)} features drifted (< {settings.drift_share:g})"
                       + (f"{': ' + ', '.join(drifted) if drifted else ''}; embeddings "
                          f"{embedding['score']:.3g} <= {embedding['threshold']:g}" if embedding else ""))
    summary = base | {"status": DRIFT if drift else NO_DRIFT, "drift": drift, "reason": "; ".join(reasons),
                      "drifted_share": share, "drifted_features": drifted, "features": scores, "embedding": embedding,
                      "not_compared": judged["not_compared"]}
    return DriftResult(summary, snapshot)


def _results_of(snapshot, metric_class) -> list[tuple[dict[str, Any], Any]]:
    """(the metric's params, its typed result) of every result of ``metric_class`` in the snapshot."""
    kind = metric_class.__get_type__()
    out = []
    for result in snapshot.metric_results.values():
        params = result.metric_value_location.metric.params
        if params.get("type") == kind:
            out.append((params, result))
    return out


def feature_scores(snapshot) -> dict[str, dict[str, Any]]:
    """Per-column drift scores of an Evidently snapshot (its typed results): score, method,
    threshold and whether the column drifted (the report's own test verdict)."""
    from evidently.core.metric_types import TestStatus
    from evidently.metrics import ValueDrift

    return {params["column"]: {"score": float(result.value), "method": params.get("method"),
                               "threshold": params.get("threshold"),
                               "drifted": any(test.status == TestStatus.FAIL for test in result.tests or [])}
            for params, result in _results_of(snapshot, ValueDrift)}


def embedding_score(snapshot, method) -> dict[str, Any] | None:
    from evidently.metrics import EmbeddingsDrift

    for _, result in _results_of(snapshot, EmbeddingsDrift):
        score = float(result.value)
        name = type(method).__name__.removesuffix("DriftMethod").lower()
        return {"score": score, "method": name, "threshold": float(method.threshold),
                "drifted": bool(np.isfinite(score) and score > method.threshold)}
    return None


def save_report(snapshot, html_path: str | Path, json_path: str | Path) -> None:
    for path in (html_path, json_path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    snapshot.save_html(str(html_path))
    snapshot.save_json(str(json_path))


def add_to_workspace(snapshot, workspace_dir: str | Path, project_name: str, run_name: str) -> str:
    """Keep the report in a local Evidently workspace (``evidently ui --workspace <dir>`` shows its
    history): the project and its drift-over-time panels are created on first use. Returns the
    project id."""
    from evidently.sdk.models import PanelMetric
    from evidently.sdk.panels import line_plot_panel
    from evidently.ui.workspace import Workspace

    workspace = Workspace.create(str(workspace_dir))
    found = workspace.search_project(project_name)
    if found:
        project = found[0]
    else:
        project = workspace.create_project(project_name, description="tumorscope drift: champion reference vs current window")
        for title, metric, labels in DASHBOARD_PANELS:
            project.dashboard.add_panel(line_plot_panel(title=title, values=[PanelMetric(legend=title, metric=metric,
                                                                                         metric_labels=labels)]))
    workspace.add_run(project.id, snapshot, name=run_name)
    return str(project.id)
