"""`tumorscope review`: the review queue from the command line: list it, record a reading, export
to and import from Label Studio, harvest the readings into a labelled batch. Params in, files out."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tumorscope.config import Params
from tumorscope.errors import UserError


def open_queue(params: Params):
    from tumorscope.review.queue import ReviewQueue

    cfg = params.review
    return ReviewQueue(cfg.queue_dir, cfg.max_items, cfg.max_age_days)


def run_review_list(params: Params, status: str) -> str:
    items = open_queue(params).items(status)
    lines = [f"{item.id}  {item.status:8}  {item.record['why']:8}  model: {item.record['answer'].get('class')}"
             + (f"  read: {item.label}" if item.label else "")
             + (f"  ({item.record['answer'].get('refer_reason')})" if item.record["answer"].get("refer_reason") else "")
             for item in items]
    return "\n".join([*lines, f"review: {len(items)} {status} item(s) in {params.review.queue_dir}"])


def run_review_label(params: Params, item: str, label: str, reviewer: str) -> str:
    done = open_queue(params).label(item, label, reviewer)
    changed = f" (was {done.labels[-1]['previous']})" if done.labels[-1]["previous"] else ""
    return f"review: {item} read as {label} by {reviewer}{changed}"


def run_review_export(params: Params, out: Path) -> str:
    from tumorscope.review.labelstudio import export_tasks, label_config

    queue = open_queue(params)
    tasks = export_tasks(queue)
    if not tasks:
        raise UserError(f"nothing to export: no pending item in {params.review.queue_dir}")
    classes = sorted({c for item in queue.items("pending") for c in item.record["classes"]})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(tasks))
    config = out.with_name(f"{out.stem}.label_config.xml")
    config.write_text(label_config(classes))
    return f"review: {len(tasks)} Label Studio task(s) -> {out}; the project's labelling config -> {config}"


def run_review_import(params: Params, export: Path) -> str:
    from tumorscope.review.labelstudio import import_annotations

    if not export.is_file():
        raise UserError(f"Label Studio export not found: {export}")
    try:
        data = json.loads(export.read_text())
    except ValueError as err:
        raise UserError(f"{export} is not JSON ({err})") from None
    outcome = import_annotations(open_queue(params), data)
    refused = outcome["refused"]
    return (f"review: {outcome['applied']} reading(s) applied, {outcome['skipped']} skipped (cancelled or empty), "
            f"{len(refused)} refused" + (": " + "; ".join(refused[:5]) if refused else ""))


def harvest_batch(params: Params, name: str | None = None,
                  added_dir: str | Path | None = None) -> tuple[Path, dict, list[str] | None]:
    """(the batch folder, counts per class and excluded, the known hashes it was checked against).
    The batch goes to data.added_dir, or ``added_dir`` (the monitoring flow stages it there and
    hands it to the retraining, which adds it to the data and versions it)."""
    from tumorscope.data.manifest import load_manifest
    from tumorscope.review.harvest import harvest

    manifest = Path(params.manifest.path)
    known = list(load_manifest(manifest)["phash"].dropna()) if manifest.is_file() else None
    batch_name = name or f"{params.review.batch_prefix}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    batch, counts = harvest(open_queue(params), added_dir or params.data.added_dir, batch_name, known,
                            params.split.phash_threshold)
    return batch, counts, known


def run_review_harvest(params: Params, name: str | None = None) -> str:
    manifest = Path(params.manifest.path)
    batch, counts, known = harvest_batch(params, name)
    excluded = counts.pop("excluded", 0)
    checked = f"checked against {len(known)} slices of {manifest}" if known else f"no {manifest}: not checked for duplicates"
    return (f"review: harvested {sum(counts.values())} slice(s) {dict(sorted(counts.items()))} -> {batch} "
            f"({excluded} excluded, see {batch}/provenance.csv; {checked}); "
            f"train on them: dvc exp run (ingest reads {params.data.added_dir})")


def run_review_accuracy(params: Params) -> tuple[str, dict]:
    """The champion's accuracy on the readings of its queued answers (``monitoring.accuracy``):
    review.report_path and, on the champion's MLflow run, the ``review.*`` metrics. No champion is
    one line, not a traceback."""
    import math

    import mlflow

    from tumorscope import registry, tracking
    from tumorscope.monitoring.accuracy import MIN_REPORT_CLASSES, classification_report, readings_frame, reviewed_accuracy
    from tumorscope.monitoring.drift import add_to_workspace
    from tumorscope.reports import write_json

    tracking.configure(params.mlflow)
    client = mlflow.MlflowClient()
    name, critical = params.promote.registered_model, params.evaluate.critical_class
    version = registry.get_version(client, name, params.serve.model)
    label = f"{name}/{version.version}"
    champion_recall = client.get_run(version.run_id).data.metrics.get(f"test_recall_{critical}")
    cfg = params.review
    items = open_queue(params).items()
    summary = reviewed_accuracy(items, cfg.sample_rate, critical, champion_recall, cfg.alpha, cfg.min_readings,
                                model_version=label)
    # Evidently's classification report of the readings, beside the drift reports in the workspace.
    snapshot = classification_report(readings_frame(items, label))
    html = Path(cfg.report_path).with_suffix(".html")
    if snapshot is not None:
        snapshot.save_html(str(html))
        add_to_workspace(snapshot, params.monitor.workspace, params.monitor.project, f"readings of {label}")
    summary["report_html"] = str(html) if snapshot is not None else None
    if snapshot is None:
        summary["report_note"] = (f"no Evidently classification report: the readings and answers hold fewer than "
                                  f"{MIN_REPORT_CLASSES} classes")
    write_json(cfg.report_path, summary)
    metrics = {"review.n_read": summary["n_read"], "review.alert": float(summary["alert"]),
               "review.decided_accuracy": summary["decided"]["accuracy"],
               "review.referred_model_right": summary["referred"]["model_right"],
               "review.accuracy": summary["all_answers"]["accuracy"],
               f"review.recall_{critical}": summary["critical"]["recall"]}
    client.log_batch(version.run_id, metrics=[
        mlflow.entities.Metric(k, float(v), int(time.time() * 1000), 0)
        for k, v in metrics.items() if v is not None and math.isfinite(float(v))])

    def show(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    head = "ALERT: " if summary["alert"] else ""
    line = (f"review accuracy: {head}{label}: {summary['n_read']} read answers "
            f"({summary['decided']['n']} decided, sampled at {cfg.sample_rate:g}: accuracy "
            f"{show(summary['decided']['accuracy'])}; {summary['referred']['n']} referred: the model was right on "
            f"{show(summary['referred']['model_right'])}); {summary['reason']} -> {cfg.report_path}"
            + (f", {summary['report_html']}" if summary["report_html"] else ""))
    return line, summary
