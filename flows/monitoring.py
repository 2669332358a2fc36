"""Monitoring flow: drift check -> alert -> retraining -> the promotion gates decide.

`check_drift` runs the same stage function as `tumorscope monitor` and the `monitor` DVC stage.
On drift the flow alerts (monitor.webhook_url and/or monitor.notification_block) and, when
monitor.retrain.deployment is set, starts that training deployment (a DVC experiment) with the new
labelled slices added to the data: a new data version, old + new.
Nothing is promoted here: the experiment's promote stage applies the gates, and with
monitor.retrain.wait_seconds > 0 this flow waits and reports their decision.
Deployed on a schedule by flows/deploy.py.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from flows.links import create_report_links
from flows.retries import TRANSIENT_RETRIES
from tumorscope.config import Params, load_params

FLOW_NAME = "tumorscope-monitor"


@task(**TRANSIENT_RETRIES)
def check_drift(params_path: str, current: str | None) -> dict:
    from tumorscope.stages.monitoring import run_monitor

    line, summary = run_monitor(load_params(params_path), current)
    get_run_logger().info(line)
    return {"line": line, "summary": summary}


@task(**TRANSIENT_RETRIES)
def check_review(params_path: str) -> dict:
    """The champion's accuracy on readings (``tumorscope review accuracy``) and how many read items
    wait to be harvested. No champion or no queue: no verdict, not a failure."""
    from tumorscope.errors import UserError
    from tumorscope.stages.review import open_queue, run_review_accuracy

    params = load_params(params_path)
    waiting = len(open_queue(params).items("labelled"))
    try:
        line, summary = run_review_accuracy(params)
    except UserError as err:
        line, summary = f"review accuracy: no verdict ({err})", {}
    get_run_logger().info(line)
    return {"line": line, "alert": bool(summary.get("alert")), "waiting": waiting, "summary": summary}


def review_retraining_reason(review: dict, retrain_after: int) -> str | None:
    """Why the readings call for a retraining (None: they do not yet)."""
    if review["alert"]:
        return "the accuracy check on readings alerts"
    if review["waiting"] >= retrain_after:
        return f"{review['waiting']} read items wait to be harvested (>= review.retrain_after {retrain_after})"
    return None


@task
def harvest_readings(params_path: str) -> str:
    """The read items as a labelled batch (``tumorscope review harvest``), staged under
    review.queue_dir/batches: the retraining adds it to data.added_dir and versions it with DVC."""
    from tumorscope.stages.review import harvest_batch

    params = load_params(params_path)
    batch, counts, _ = harvest_batch(params, added_dir=Path(params.review.queue_dir) / "batches")
    get_run_logger().info("harvested %s -> %s", counts, batch)
    return str(batch.resolve())


@task
def send_alert(params_path: str, line: str, summary: dict, retraining: dict | None) -> dict:
    """Webhook and/or Prefect block; a failed alert is reported in the result, it does not hide the verdict."""
    from tumorscope.errors import UserError
    from tumorscope.monitoring.alerts import alert_payload, notify_block, post_webhook

    cfg = load_params(params_path).monitor
    payload = alert_payload(line, summary, {"retraining": retraining})
    sent: dict = {}
    if cfg.webhook_url:
        try:
            sent["webhook"] = {"status": post_webhook(cfg.webhook_url, payload)}
        except UserError as err:
            sent["webhook"] = {"error": str(err)}
    if cfg.notification_block:
        try:
            subject = ("tumorscope: drift detected" if summary.get("drift") else
                       "tumorscope: accuracy on readings fell" if summary.get("review_alert") else
                       "tumorscope: referral rate rising")
            notify_block(cfg.notification_block, subject, line)
            sent["block"] = {"sent": cfg.notification_block}
        except UserError as err:
            sent["block"] = {"error": str(err)}
    for channel, outcome in sent.items():
        if "error" in outcome:
            get_run_logger().warning("alert via %s failed: %s", channel, outcome["error"])
    return sent


def retraining_data(params: Params, current: str) -> str | None:
    """The labelled folder the retraining run adds to the data (old + new): monitor.retrain.new_data,
    else the monitored folder when it holds class folders named like the champion's classes, else
    None (retrain on the data as it is; an inference log carries no labels to train on)."""
    from tumorscope.config import CANONICAL_CLASSES

    if params.monitor.retrain.new_data:
        return params.monitor.retrain.new_data
    path = Path(current)
    if path.is_dir():
        folders = {d.name for d in path.iterdir() if d.is_dir() and not d.name.startswith((".", "_"))}
        if folders and folders <= set(CANONICAL_CLASSES) | set(params.data.class_map):
            return str(path.resolve())
    return None


def promotion_decision(params: Params, since_ms: int) -> dict | None:
    """The gate decision of the newest model version registered since ``since_ms`` (MLflow registry:
    its promotion_decision tag and the decision line of its run's promotion report)."""
    import mlflow

    from tumorscope import tracking

    tracking.configure(params.mlflow)
    client = mlflow.MlflowClient()
    name = params.promote.registered_model
    versions = [v for v in client.search_model_versions(f"name = '{name}'") if int(v.creation_timestamp) >= since_ms]
    if not versions:
        return None
    newest = max(versions, key=lambda v: int(v.version))
    decision = {"version": f"{name}/{newest.version}", "decision": newest.tags.get("promotion_decision")}
    try:
        local = client.download_artifacts(str(newest.run_id), f"promotion/{Path(params.promote.report_path).name}")
        decision["line"] = json.loads(Path(local).read_text())["decision"]
    except Exception as err:  # no report logged (the run failed before promote)
        decision["line"] = f"no promotion report on run {newest.run_id} ({type(err).__name__})"
    return decision


@task
def trigger_retraining(params_path: str, current: str, new_data: str | None = None) -> dict:
    """Start the training deployment with ``new_data`` (else ``retraining_data``) added; with
    monitor.retrain.wait_seconds > 0 wait for it and read the promotion gates' decision."""
    from typing import cast

    from prefect.client.schemas.objects import FlowRun
    from prefect.deployments import run_deployment

    params = load_params(params_path)
    cfg = params.monitor.retrain
    new_data = new_data or retraining_data(params, current)
    parameters = ({"reuse_champion": not cfg.tune} | ({"warm_start": True} if cfg.warm_start and not cfg.tune else {})
                  | dict(cfg.parameters)
                  | ({"add_data": new_data} if new_data else {}))
    started_ms = int(time.time() * 1000)
    if not cfg.deployment:
        raise ValueError("monitor.retrain.deployment is not set")
    # run_deployment is sync-compatible: called from sync code it returns the flow run, not a coroutine.
    run = cast(FlowRun, run_deployment(cfg.deployment, parameters=parameters, timeout=cfg.wait_seconds, as_subflow=False))
    result = {"deployment": cfg.deployment, "flow_run_id": str(run.id), "flow_run_name": run.name,
              "parameters": parameters, "state": run.state.type.value if run.state else None}
    if cfg.wait_seconds > 0:
        if run.state is not None and run.state.is_final():
            result["promotion"] = promotion_decision(params, started_ms)
        else:
            result["promotion"] = None
            result["note"] = f"still running after monitor.retrain.wait_seconds={cfg.wait_seconds}"
    get_run_logger().info("retraining: %s", result)
    return result


@flow(name=FLOW_NAME, log_prints=True)
def monitoring_flow(params_path: str = "params.yaml", current: str | None = None, retrain: bool = True) -> dict:
    """Drift of ``current`` (default: the service's inference log, serve.inference_log) vs the
    champion's reference, and the champion's accuracy on radiologists' readings; on drift, on an
    accuracy alert or once review.retrain_after read items wait: alert and, when ``retrain`` and
    monitor.retrain.deployment are set, start retraining with the harvested readings (gated
    promotion); on a rising referral rate: alert."""
    params = load_params(params_path)
    current = current or params.serve.inference_log
    checked = check_drift(params_path, current)
    summary = checked["summary"]
    referral_rising = (summary.get("referral") or {}).get("status") == "rising"
    result: dict = {"line": checked["line"], "status": summary["status"], "drift": summary.get("drift"),
                    "referral_rising": referral_rising, "summary_path": summary.get("written_to")}
    # Readings: is the champion still right, and are there enough new labels to learn from?
    review = check_review(params_path)
    result["review"] = {k: review[k] for k in ("line", "alert", "waiting")}
    reason = review_retraining_reason(review, params.review.retrain_after)
    if retrain and params.monitor.retrain.deployment and (reason or summary.get("drift")):
        batch = harvest_readings(params_path) if reason else None
        result["retraining"] = trigger_retraining(params_path, current, batch) | {
            "why": reason or "drift", "harvested": batch}
    # A rising referral rate alerts without retraining: the referred slices have no labels yet.
    if summary.get("drift") or referral_rising:
        result["alert"] = send_alert(params_path, checked["line"], summary, result.get("retraining"))
    if review["alert"]:
        result["review_alert"] = send_alert(params_path, review["line"], {"review_alert": True}, result.get("retraining"))
    create_markdown_artifact(f"{checked['line']}\n\nSummary: `{summary.get('written_to')}`"
                             + (f"\n\nRetraining: `{result['retraining']}`" if "retraining" in result else ""),
                             key="tumorscope-drift", description="drift check of the champion")
    if summary.get("report_html"):
        create_report_links(params, summary["report_html"])
    return result


if __name__ == "__main__":  # python -m flows.monitoring [CURRENT]: one check now
    import sys

    print(json.dumps(monitoring_flow(current=sys.argv[1] if len(sys.argv) > 1 else None), indent=2, default=str))
