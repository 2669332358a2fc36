"""Link artefacts in Prefect to the reports a run produced, so the flow run's page leads to them:
the Great Expectations Data Docs of the validated data and Evidently's drift report (file links on
the host that ran the flow; the MLflow link of a tuning study is in flows/tuning.py)."""

from __future__ import annotations

from pathlib import Path

from tumorscope.config import Params

DATA_DOCS_KEY = "tumorscope-data-docs"
DRIFT_REPORT_KEY = "tumorscope-drift-report"


def report_links(params: Params, drift_report: str | None = None) -> list[tuple[str, str, str]]:
    """(artefact key, file URI, link text) of the reports that exist; ``drift_report`` defaults to
    the monitor stage's (monitor.report_dir/drift.html)."""
    docs = Path(params.validate_.docs_dir) / "index.html"
    drift = Path(drift_report) if drift_report else Path(params.monitor.report_dir) / "drift.html"
    found = [(DATA_DOCS_KEY, docs, "Great Expectations Data Docs of the validated data"),
             (DRIFT_REPORT_KEY, drift, "Evidently drift report")]
    return [(key, path.resolve().as_uri(), text) for key, path, text in found if path.is_file()]


def create_report_links(params: Params, drift_report: str | None = None) -> list[str]:
    """A link artefact per existing report; returns their keys."""
    from prefect.artifacts import create_link_artifact

    links = report_links(params, drift_report)
    for key, uri, text in links:
        create_link_artifact(uri, link_text=text, key=key, description=f"{text} ({uri})")
    return [key for key, _, _ in links]
