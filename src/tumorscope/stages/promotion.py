"""Promote (registry gates and aliases) and rollback: the stages after evaluation.

The challenger and the champion are compared on the same test slices, prepared through
``tumorscope.inference`` (the cache's decoding and preprocessing) and scored by
``models.evaluate``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tumorscope.config import Params
from tumorscope.errors import UserError
from tumorscope.reports import read_json, write_json


def _trained_model_summary(params: Params) -> dict:
    path = Path(params.train.model_dir) / "train.json"
    if not path.is_file():
        raise UserError(f"{path} not found (run tumorscope train and evaluate first)")
    summary = read_json(path)
    if "model_uri" not in summary:
        raise UserError(f"{path} has no model_uri (written by an older version): retrain with tumorscope train")
    return summary


def champion_test_probabilities(params: Params, champion, spec: dict, images: np.ndarray, classes: list[str],
                                labels: np.ndarray) -> np.ndarray:
    """The champion's probabilities on the challenger's test slices, in the challenger's class order.
    The cache serves when both models prepare files the same way; otherwise the test files are read
    again through the champion's own input spec."""
    from tumorscope.data.split import read_split_table, rows_in_cache_order
    from tumorscope.inference import prepare_file, same_pixels, stack

    if sorted(champion.classes) != sorted(classes):
        raise UserError(f"champion {champion.version} knows classes {champion.classes}, the challenger {classes}: "
                        "they cannot be compared on one test set (register under another promote.registered_model)")
    if same_pixels(champion.spec, spec):
        batch = images
    else:
        rows = rows_in_cache_order(read_split_table(params.split.path), classes, labels, ("test",),
                                   f"{params.split.path} vs {params.preprocess.cache_dir}")
        batch = stack([prepare_file(path, champion.spec) for path in rows["path"]], champion.image_size)
    probabilities = champion.predict_proba(batch)
    return probabilities[:, [champion.classes.index(c) for c in classes]]


def run_promote(params: Params) -> str:
    """Register the evaluated model as ``challenger``; make it ``champion`` if it passes the gates
    (promote.*): absolute ones on its test scores, and the paired comparison with the current
    champion on the same test slices. Writes promote.report_path and logs the decision to the
    challenger's MLflow run. A refusal is an outcome, not an error."""
    import mlflow

    from tumorscope import registry, tracking
    from tumorscope.data.preprocess import load_groups, load_split
    from tumorscope.inference import load_model_dir
    from tumorscope.models import evaluate as ev

    cfg = params.promote
    summary = _trained_model_summary(params)
    report_path = Path(params.evaluate.out_dir) / "report.json"
    if not report_path.is_file():
        raise UserError(f"{report_path} not found (run tumorscope evaluate first)")
    scores = read_json(report_path)
    challenger = load_model_dir(params.train.model_dir)
    classes = challenger.classes
    images, labels = load_split(params.preprocess.cache_dir, "test")
    groups = load_groups(params.preprocess.cache_dir, "test")

    tracking.configure(params.mlflow)
    client = mlflow.MlflowClient()
    run = client.get_run(summary["run_id"])
    known = [v for v in client.search_model_versions(f"name = '{cfg.registered_model}'")
             if v.run_id == summary["run_id"]] if client.search_registered_models(
                 filter_string=f"name = '{cfg.registered_model}'") else []
    version = known[0] if known else registry.register(
        cfg.registered_model, summary["model_uri"], summary["run_id"],
        {k: v for k, v in run.data.tags.items() if k in ("git_commit", "dataset_fingerprint", "dvc_raw_md5")})
    label = f"{cfg.registered_model}/{version.version}"
    champion_version = registry.current_champion(cfg.registered_model)
    comparison = None
    champion_label = None
    if champion_version is not None and champion_version.version == version.version:
        return f"promote: {label} is already the champion; nothing to decide"
    if champion_version is not None:
        champion = registry.load_model(cfg.registered_model, str(champion_version.version))
        champion_label = champion.version
        champion_probabilities = champion_test_probabilities(params, champion, challenger.spec, images, classes, labels)
        challenger_predicted = challenger.predict_proba(images).argmax(axis=1)
        champion_predicted = champion_probabilities.argmax(axis=1)
        comparison = ev.paired_group_bootstrap(labels, challenger_predicted, champion_predicted, groups, len(classes),
                                               params.evaluate.bootstrap_samples, params.evaluate.confidence, params.seed)
        comparison["mcnemar"] = ev.mcnemar_exact(challenger_predicted == labels, champion_predicted == labels)
        comparison["champion_scores"] = ev.summary_scores(ev.score_predictions(
            labels, champion_probabilities, groups, classes, params.evaluate, params.seed))
    gates = [*registry.absolute_gates(scores, cfg), registry.comparison_gate(comparison, cfg)]
    promoted = all(g.passed for g in gates)
    line = registry.decision_line(label, promoted, gates, champion_label)
    if promoted:
        registry.make_champion(cfg.registered_model, str(version.version), line)
    client.set_model_version_tag(cfg.registered_model, str(version.version), "promotion_decision",
                                 "promoted" if promoted else "refused")
    # No run ids or times: the report is a DVC output and must repeat for the same models.
    report = {"registered_model": cfg.registered_model, "challenger_version": int(version.version),
              "champion_version_before": int(champion_version.version) if champion_version else None,
              "promoted": promoted, "decision": line, "gates": registry.gates_record(gates),
              "challenger_scores": ev.summary_scores(scores), "comparison": comparison,
              "thresholds": cfg.model_dump()}
    write_json(cfg.report_path, report)
    with mlflow.start_run(run_id=summary["run_id"]):
        mlflow.log_metrics({"promote_promoted": float(promoted), **{
            f"promote_gate_{g.name}": float(g.passed) for g in gates}}
            | ({"promote_macro_f1_difference": comparison["macro_f1_difference"],
                "promote_macro_f1_difference_low": comparison["low"]} if comparison else {}))
        mlflow.set_tag("promotion", "promoted" if promoted else "refused")
        mlflow.log_artifact(cfg.report_path, artifact_path="promotion")
    return line


def run_rollback(params: Params, reason: str, to_version: str | None = None) -> str:
    """Point ``champion`` back at the previous champion (or ``to_version``), recorded in MLflow."""
    from tumorscope import registry, tracking

    if not reason.strip():
        raise UserError("rollback needs a reason (--reason): it is recorded with who and when")
    tracking.configure(params.mlflow)
    name = params.promote.registered_model
    before, after = registry.rollback(name, reason.strip(), to_version)
    return f"rollback: {name} champion {before} -> {after} by {registry.actor()}: {reason.strip()}"



