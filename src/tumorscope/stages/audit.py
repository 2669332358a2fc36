"""The audit stage: what the prepared data set can teach, before anything is trained.

Reads the cache (every split: the audit describes the data set, not one split) and the split table
(paths: the source of each slice), writes ``audit.report_path``, ``audit.summary_path`` and the
DVC metrics ``audit.metrics_path``, and logs them on an MLflow run of their own.
"""

from __future__ import annotations

from pathlib import Path

from tumorscope.config import Params
from tumorscope.errors import UserError
from tumorscope.reports import write_json

ADDED = "added"
SOURCE = "data.source"


def source_of(path: str, raw_dir: str) -> str:
    """'data.source' for a file of ``data.source``; 'added/<batch>' for one of a labelled batch added
    later (ingest copies those to ``raw_dir/<label>/added/<batch>/``)."""
    try:
        parts = Path(path).relative_to(raw_dir).parts
    except ValueError:
        return SOURCE
    return f"{ADDED}/{parts[2]}" if len(parts) > 3 and parts[1] == ADDED else SOURCE


def run_audit(params: Params) -> str:
    import numpy as np

    from tumorscope.data.audit import audit_dataset, audit_markdown, audit_metrics
    from tumorscope.data.preprocess import load_cached_dataset, load_classes
    from tumorscope.data.split import SPLITS, read_split_table, rows_in_cache_order
    from tumorscope.models.evaluate import format_interval

    cfg, cache = params.audit, params.preprocess.cache_dir
    if not (Path(cache) / "classes.json").is_file():
        raise UserError(f"{cache} has no cache: run the data stages first (dvc repro preprocess)")
    classes = load_classes(cache)
    images, labels, groups = load_cached_dataset(cache)
    rows = rows_in_cache_order(read_split_table(params.split.path), classes, labels, SPLITS,
                               f"{params.split.path} vs {cache}")
    sources = np.array([source_of(path, params.data.raw_dir) for path in rows["path"]], dtype=object)
    report = audit_dataset(images, labels, groups, sources, classes, cfg, params.evaluate, params.seed)
    write_json(cfg.report_path, report)
    write_json(cfg.metrics_path, audit_metrics(report))
    Path(cfg.summary_path).write_text(audit_markdown(report))
    _log_to_mlflow(params, report)
    shares = ", ".join(f"{o} {share:.0%}" for o, share in report["orientation_share"].items())
    baselines = report["acquisition_baselines"]
    known = [f"{name} {baselines[name]['macro_f1']:.3f}{format_interval(baselines[name]['macro_f1_ci'])}"
             for name in ("intensity", "thumbnail") if name in baselines]
    lines = [f"audit: {report['n_slices']} slices in {report['n_series']} series; {shares}; acquisition-only "
             f"baselines macro-F1 {', '.join(known) or 'not fitted (too few series)'} ({cfg.summary_path})"]
    lines += [f"audit: WARNING {warning}" for warning in report["warnings"]]
    return "\n".join(lines)


def _log_to_mlflow(params: Params, report: dict) -> None:
    import mlflow

    from tumorscope import tracking
    from tumorscope.data.audit import audit_metrics

    metrics = tracking.flatten(audit_metrics(report))
    experiment_id = tracking.configure(params.mlflow)
    with mlflow.start_run(experiment_id=experiment_id, run_name="audit",
                          tags=tracking.version_tags(params) | {"stage": "audit"}):
        mlflow.log_params(tracking.flatten({"audit": params.audit.model_dump()}))
        mlflow.log_metrics({name: float(value) for name, value in metrics.items()  # type: ignore[arg-type]
                            if value is not None})
        for path in (params.audit.report_path, params.audit.summary_path):
            mlflow.log_artifact(path, artifact_path="audit")
