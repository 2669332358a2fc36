"""Monitor: drift of a current window against the champion's reference.

The reference is the champion's own data version: the train and test slices of the cache it
trained on, with its answers on them. It is computed once per champion version, kept in
monitor.reference_dir and logged to the champion's MLflow run, so a later data version in the
workspace does not change what "no drift" means.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import pandas as pd

from tumorscope.config import Params
from tumorscope.errors import UserError
from tumorscope.reports import write_json

REFERENCE_ARTIFACT = "monitoring/reference.csv"
NO_REFERENCE = "no_reference"
METRIC_PREFIX = "monitor_"


def reference_path(params: Params, champion) -> Path:
    """Where the reference of ``champion`` is kept: named by its version and its run (a registry
    rebuilt from scratch reuses version numbers, never run ids) and the embedding size."""
    run = str(champion.source.get("run_id") or "norun")[:12]
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{champion.version}-{run}-emb{params.serve.embedding_dims}")
    return Path(params.monitor.reference_dir) / safe / Path(REFERENCE_ARTIFACT).name


def _reference_from_cache(params: Params, champion) -> pd.DataFrame:
    """The champion's train and test slices from this workspace's cache, with its answers on them
    (and its referrals on the test slices)."""
    from tumorscope.data.preprocess import load_split
    from tumorscope.data.split import read_split_table, rows_in_cache_order
    from tumorscope.monitoring.features import feature_frame, model_outputs

    table = read_split_table(params.split.path)
    manifest = pd.read_csv(params.manifest.path, keep_default_na=False, usecols=["path", "width", "height", "mode"])
    frames = []
    for split in ("train", "test"):
        images, labels = load_split(params.preprocess.cache_dir, split)
        rows = rows_in_cache_order(table, champion.classes, labels, (split,),
                                   f"{params.split.path} vs {params.preprocess.cache_dir}")
        meta = rows[["path"]].merge(manifest, on="path", how="left")
        probabilities, embeddings = model_outputs(champion.model, images, params.serve.embedding_dims)
        # The reference referral rate is the test split's: training slices are referred less (the
        # feature-space check was fitted on them), new slices like the held-out ones.
        judged = champion.answers(images)[1] if split == "test" else None
        frames.append(feature_frame(images, meta[["height", "width"]].to_numpy(dtype=float), meta["mode"].astype(str).tolist(),
                                    probabilities, champion.classes, embeddings, judged))
    return pd.concat(frames, ignore_index=True)


def reference_window(params: Params, champion, client) -> tuple[pd.DataFrame, str]:
    """(reference rows, where they came from): the stored file, the champion run's artifact, or
    computed from this workspace's cache when it holds the champion's data version and pixels."""
    from tumorscope import tracking
    from tumorscope.inference import input_spec, same_pixels

    path = reference_path(params, champion)
    if path.is_file():
        return pd.read_csv(path), f"{path}"
    run_id = champion.source.get("run_id")
    if run_id:
        try:
            local = client.download_artifacts(run_id, REFERENCE_ARTIFACT)
            stored = pd.read_csv(local)
            if sum(c.startswith("emb_") for c in stored.columns) == params.serve.embedding_dims:
                path.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(local, path)
                return stored, f"{REFERENCE_ARTIFACT} of run {run_id}"
        except Exception:  # not logged yet: computed below
            pass
    trained_on = client.get_run(run_id).data.tags.get("dataset_fingerprint") if run_id else None
    split_path = Path(params.split.path)
    here = tracking.file_fingerprint(split_path) if split_path.is_file() else None
    if trained_on is None or trained_on != here:
        raise UserError(f"no reference for {champion.version}: it trained on data version {trained_on}, this workspace "
                        f"holds {here} and no reference was stored for it; check out its data version "
                        "(git checkout <its commit> && dvc checkout) and run tumorscope monitor once")
    spec_here = input_spec(champion.classes, params.preprocess, params.data.dicom_window)
    if not same_pixels(champion.spec, spec_here):
        raise UserError(f"no reference for {champion.version}: the cache in {params.preprocess.cache_dir} was prepared with "
                        "other preprocess settings than it trained on; rerun dvc repro at its params")
    frame = _reference_from_cache(params, champion)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False)
    if run_id:
        client.log_artifact(run_id, str(path), artifact_path=Path(REFERENCE_ARTIFACT).parent.as_posix())
    return frame, f"computed from {params.preprocess.cache_dir} (train and test splits)"


def current_window(params: Params, champion, current: str):
    """The inference log (*.jsonl) or a folder of slices named by ``current``."""
    from tumorscope.monitoring.windows import Window, folder_window, read_log_window
    from tumorscope.stages.prediction import _visible_files, collect_sources

    path = Path(current)
    if path.suffix == ".jsonl":
        return read_log_window(path, champion.version, params.monitor.window, params.serve.embedding_dims)
    if not path.exists():
        raise UserError(f"monitor: current window {path} not found (a folder of new slices, or the service's "
                        f"inference log, serve.inference_log = {params.serve.inference_log})")
    if not path.is_dir():
        raise UserError(f"monitor: current window {path} is neither a folder of slices nor an inference log (*.jsonl)")
    if not _visible_files(path):
        window = Window(pd.DataFrame(), f"folder {path}")
        window.leave_out("empty folder", str(path))
        return window
    files, _, _ = collect_sources([path], champion.classes, params.data.image_extensions)
    return folder_window(files, champion, params.serve.embedding_dims, f"folder {path}")


def monitoring_metrics(summary: dict) -> dict[str, float]:
    """The summary as MLflow metrics (drift 1/0, drifted share, embedding score, per-feature scores,
    referral rate, out-of-distribution share and whether the referral rate rose)."""
    from tumorscope.monitoring.referral_rate import referral_metrics

    metrics = {"drift": float(bool(summary.get("drift"))), "n_current": float(summary["n_current"])}
    if summary.get("drifted_share") is not None:
        metrics["drifted_share"] = float(summary["drifted_share"])
    if summary.get("embedding"):
        metrics["embedding_score"] = float(summary["embedding"]["score"])
    for name, score in (summary.get("features") or {}).items():
        metrics[f"score_{name}"] = float(score["score"])
    metrics |= referral_metrics(summary.get("referral"))
    return {METRIC_PREFIX + k: v for k, v in metrics.items()}


def _log_to_champion(client, run_id: str, summary: dict, paths: list[Path]) -> None:
    import math
    import time

    from mlflow.entities import Metric

    step = len(client.get_metric_history(run_id, f"{METRIC_PREFIX}drift"))
    now = int(time.time() * 1000)
    metrics = [Metric(k, v, now, step) for k, v in monitoring_metrics(summary).items() if math.isfinite(v)]
    client.log_batch(run_id, metrics=metrics)
    for path in paths:
        client.log_artifact(run_id, str(path), artifact_path=f"monitoring/{step:04d}")


def summary_line(summary: dict) -> str:
    from tumorscope.monitoring.referral_rate import referral_line

    where = f"{summary.get('current')} vs {summary.get('model_version')}'s reference"
    if summary["status"] == NO_REFERENCE:
        return f"monitor: no verdict ({summary['reason']})"
    counts = f"({summary['n_reference']} reference, {summary['n_current']} current slices)"
    left = summary.get("left_out") or {}
    left_text = f"; left out: {', '.join(f'{n} {why}' for why, n in left.items())}" if left else ""
    unread = summary.get("not_read") or {}
    if unread.get("bytes"):
        left_text += (f"; older log not read: {unread['bytes'] / 1e6:.1f} MB"
                      + (f" ({unread['files']} rotated files)" if unread.get("files") else ""))
    verdict = {"drift": "DRIFT", "no_drift": "no drift", "insufficient_data": "no verdict"}[summary["status"]]
    return f"monitor: {verdict} in {where} {counts}: {summary['reason']}{referral_line(summary.get('referral'))}{left_text}"


def verdict_metrics(summary: dict) -> dict:
    """The verdict as DVC metrics (``dvc exp show`` lists them per experiment): drift true/false
    (null without a verdict), the drifted share of features, the window's size, and whether the
    referral rate rose."""
    from tumorscope.monitoring.referral_rate import RISING

    referral = summary.get("referral") or {}
    return {"drift": summary["drift"], "drifted_share": summary.get("drifted_share"),
            "n_current": summary.get("n_current"), "referral_rising": referral.get("status") == RISING}


def write_summary(params: Params, summary_path: Path, summary: dict) -> Path:
    """The summary; for the DVC stage's own window also monitor.metrics_path."""
    if summary_path == Path(params.monitor.summary_path):
        write_json(params.monitor.metrics_path, verdict_metrics(summary))
    return write_json(summary_path, summary)


def output_paths(params: Params, current: str) -> tuple[Path, Path]:
    """(summary file, report folder). The DVC stage's window (monitor.current) writes the stage's
    declared outputs; any other window (the flow on the inference log, an ad hoc --current) writes
    a folder of its own under monitor.checks_dir, so the stage's outputs stay what DVC recorded."""
    from datetime import UTC, datetime

    cfg = params.monitor
    if Path(current) == Path(cfg.current):
        return Path(cfg.summary_path), Path(cfg.report_dir)
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(current).name or "window").strip("-")[:60]
    folder = Path(cfg.checks_dir) / f"{datetime.now(UTC):%Y%m%dT%H%M%S%f}-{slug}"
    return folder / "summary.json", folder


def run_monitor(params: Params, current: str | None = None) -> tuple[str, dict[str, Any]]:
    """Compare the current window (``current`` or monitor.current) with the champion's reference;
    write the summary (and drift.html, drift.json when a report was computed; see ``output_paths``),
    keep the report in the Evidently workspace and log the scores to the champion's run. Returns
    (one line, the summary). No champion or no reference is a "no verdict" outcome, not an error."""
    import os

    import mlflow

    from tumorscope import registry, tracking
    from tumorscope.monitoring.drift import DriftSettings, add_to_workspace, compare, save_report
    from tumorscope.monitoring.referral_rate import referral_summary

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    cfg = params.monitor
    current = current or cfg.current
    summary_path, out = output_paths(params, current)
    out.mkdir(parents=True, exist_ok=True)  # the stage's declared output (empty without a report)
    for stale in (out / "drift.html", out / "drift.json"):
        stale.unlink(missing_ok=True)  # never leave an earlier window's report beside this summary
    tracking.configure(params.mlflow)
    client = mlflow.MlflowClient()
    try:
        champion = registry.load_model(params.promote.registered_model, params.serve.model)
        reference, reference_source = reference_window(params, champion, client)
    except UserError as err:
        summary = {"status": NO_REFERENCE, "drift": None, "reason": str(err), "current": current}
        write_summary(params, summary_path, summary)
        return summary_line(summary), summary | {"written_to": str(summary_path)}
    window = current_window(params, champion, current)
    settings = DriftSettings.of(cfg)
    result = compare(reference, window.frame, settings)
    # No times or run ids: the summary is a DVC output and repeats for the same inputs.
    summary = result.summary | {"referral": referral_summary(reference, window.frame, cfg.min_window),
                                "model_version": champion.version, "current": window.source,
                                "reference": reference_source, "left_out": dict(window.left_out),
                                "left_out_examples": window.examples, "not_read": dict(window.not_read)}
    written = [write_summary(params, summary_path, summary)]
    if result.snapshot is not None:
        save_report(result.snapshot, out / "drift.html", out / "drift.json")
        written += [out / "drift.html"]
        add_to_workspace(result.snapshot, cfg.workspace, cfg.project, f"{champion.version} vs {window.source}")
    if champion.source.get("run_id"):
        _log_to_champion(client, champion.source["run_id"], summary, written)
    report = out / "drift.html" if result.snapshot is not None else None
    line = summary_line(summary) + (f"; report {report}" if report else "")
    return line, summary | {"written_to": str(summary_path), "report_html": str(report) if report else None}
