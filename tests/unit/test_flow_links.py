"""The reports a flow run links to: only those that exist, as file URIs."""

from __future__ import annotations

from flows.links import DATA_DOCS_KEY, DRIFT_REPORT_KEY, report_links
from tumorscope.config import parse_params


def test_links_name_only_reports_that_exist(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = parse_params({})
    assert report_links(params) == []
    docs = tmp_path / params.validate_.docs_dir / "index.html"
    docs.parent.mkdir(parents=True)
    docs.write_text("<html></html>")
    assert report_links(params) == [(DATA_DOCS_KEY, docs.as_uri(), "Great Expectations Data Docs of the validated data")]
    check = tmp_path / "monitoring" / "checks" / "t-log" / "drift.html"
    check.parent.mkdir(parents=True)
    check.write_text("<html></html>")
    keys = {key: uri for key, uri, _ in report_links(params, str(check.relative_to(tmp_path)))}
    assert keys == {DATA_DOCS_KEY: docs.as_uri(), DRIFT_REPORT_KEY: check.as_uri()}
