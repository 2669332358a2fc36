"""The reports a flow run links to: only those that exist, as file URIs."""

from __future__ import annotations

from flows.links import DATA_DOCS_KEY, DRIFT_REPORT_KEY, report_links
from helpers.params import defaults


def test_links_name_only_reports_that_exist(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = defaults()
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


def test_readings_call_for_a_retraining_on_an_alert_or_enough_new_labels():
    from flows.monitoring import review_retraining_reason

    assert review_retraining_reason({"alert": True, "waiting": 0}, 100) == "the accuracy check on readings alerts"
    assert review_retraining_reason({"alert": False, "waiting": 100}, 100) == (
        "100 read items wait to be harvested (>= review.retrain_after 100)")
    assert review_retraining_reason({"alert": False, "waiting": 99}, 100) is None


def test_the_demos_params_are_the_projects_with_its_changes_and_valid(tmp_path, monkeypatch):
    from flows.demo import demo_params
    from helpers.paths import REPO
    from tumorscope.config import parse_params

    monkeypatch.chdir(REPO)  # it reads the project's params.yaml, as make demo does
    params = parse_params(demo_params(tmp_path / ".demo", 40, tmp_path / "service.keys"))
    assert params.monitor.retrain.deployment == "tumorscope-experiment/train" and params.monitor.window == 40
    assert params.monitor.retrain.tune is False  # kept from params.yaml: the champion's configuration
    assert params.serve.auth.keys_file == str((tmp_path / "service.keys").resolve()) and params.review.retrain_after == 1
