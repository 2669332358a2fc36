"""Promote (registry gates and aliases) and rollback: the stages after evaluation.

The challenger and the champion are compared on the same test slices, prepared through
``tumorscope.inference`` (the cache's decoding and preprocessing) and scored by
``models.evaluate``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tumorscope.artifacts import EVALUATION_REPORT, TRAIN_REPORT
from tumorscope.config import Params
from tumorscope.errors import UserError
from tumorscope.reports import read_json, write_json

# What a registered version records of its training run; the split table the run logged.
RUN_VERSION_TAGS = ("git_commit", "dataset_fingerprint", "dvc_raw_md5")
SPLIT_ARTIFACT = "data/split.csv"


def _trained_model_summary(params: Params) -> dict:
    path = Path(params.train.model_dir) / TRAIN_REPORT
    if not path.is_file():
        raise UserError(f"{path} not found (run tumorscope train and evaluate first)")
    summary = read_json(path)
    if "model_uri" not in summary:
        raise UserError(f"{path} has no model_uri (written by an older version): retrain with tumorscope train")
    return summary


def champion_test_probabilities(champion, spec: dict, images: np.ndarray, classes: list[str],
                                test_paths: list[str]) -> np.ndarray:
    """The champion's probabilities on the challenger's test slices, in the challenger's class order.
    The cache serves when both models prepare files the same way; otherwise the test files are read
    again through the champion's own input spec."""
    from tumorscope.data.images import UnreadableImage
    from tumorscope.inference import prepare_file, same_pixels, stack

    if sorted(champion.classes) != sorted(classes):
        raise UserError(f"champion {champion.version} knows classes {champion.classes}, the challenger {classes}: "
                        "they cannot be compared on one test set (register under another promote.registered_model)")
    if same_pixels(champion.spec, spec):
        batch = images
    else:
        try:
            batch = stack([prepare_file(path, champion.spec) for path in test_paths], champion.image_size)
        except (OSError, UnreadableImage) as err:
            raise UserError(f"promote: cannot read the test files again for {champion.version}'s preprocessing "
                            f"({err}); rerun the data stages") from None
    probabilities = champion.predict_proba(batch)
    return probabilities[:, [champion.classes.index(c) for c in classes]]


def _challenger_version(client, cfg, summary: dict):
    """The registered version of the evaluated model's run (registered now if it is not yet), with
    the challenger alias on it."""
    from mlflow.exceptions import MlflowException

    from tumorscope import registry

    try:
        run = client.get_run(summary["run_id"])
        known = (client.search_model_versions(f"name = '{cfg.registered_model}' and run_id = '{summary['run_id']}'")
                 if client.search_registered_models(filter_string=f"name = '{cfg.registered_model}'") else [])
        if known:
            version = known[0]
            client.set_registered_model_alias(cfg.registered_model, registry.CHALLENGER, version.version)
            return version, run
        return registry.register(cfg.registered_model, summary["model_uri"], summary["run_id"],
                                 {k: v for k, v in run.data.tags.items() if k in RUN_VERSION_TAGS}), run
    except MlflowException as err:
        raise UserError(f"promote: the trained model's MLflow run {summary['run_id']} cannot be registered "
                        f"({str(err).splitlines()[0]}); is mlflow.tracking_uri the store it trained into? "
                        "Retrain with tumorscope train") from None


def unseen_by_champion(params: Params, client, champion_run_id: str, challenger_run,
                       test_hashes: np.ndarray) -> tuple[np.ndarray, str]:
    """Mask of the challenger's test slices the champion did not train on. The same data version:
    all of them (a split never leaks). Another data version: the champion's training slices are read
    from the split table logged with its run, and test slices within split.phash_threshold of one are
    left out of the comparison (a champion tested on its own training slices would look better than
    it is)."""
    from tumorscope.data.split import nearest_distances, read_split_table

    champion_fingerprint = client.get_run(champion_run_id).data.tags.get("dataset_fingerprint")
    if champion_fingerprint == challenger_run.data.tags.get("dataset_fingerprint"):
        return np.ones(len(test_hashes), dtype=bool), "same data version"
    try:
        local = client.download_artifacts(champion_run_id, SPLIT_ARTIFACT)
    except Exception:  # an older run without its split table
        raise UserError(f"promote: the champion's run {champion_run_id} has no {SPLIT_ARTIFACT} and trained on other "
                        "data: its training slices are unknown, so the comparison would not be fair. Retrain the "
                        "champion with this version, or roll it back") from None
    champion_train = read_split_table(local)
    champion_train = champion_train.loc[champion_train["split"] == "train", "phash"]
    distance = nearest_distances(test_hashes, champion_train.to_numpy())
    unseen = distance > params.split.phash_threshold
    return unseen, f"other data version: {int((~unseen).sum())} test slices near the champion's training slices left out"


def read_by_radiologists(split_paths: list[str], batch_prefix: str) -> np.ndarray:
    """Mask of slices that came from a harvested review batch: ingest copies a batch of
    data.added_dir to ``<raw_dir>/<label>/added/<batch>/...``, and harvest names its batches
    ``<review.batch_prefix>-<time>`` (the retraining adds ``-<content digest>``)."""
    from tumorscope.data.ingest import ADDED

    def from_a_review_batch(path: str) -> bool:
        parts = Path(path).parts
        return any(part == ADDED and i + 1 < len(parts) - 1 and parts[i + 1].startswith(f"{batch_prefix}-")
                   for i, part in enumerate(parts))

    return np.array([from_a_review_batch(p) for p in split_paths], dtype=bool)


def promotion_metrics(report: dict) -> dict:
    """The decision as DVC metrics: whether the challenger was promoted, the champion afterwards and
    how many gates failed (``dvc exp show`` lists them per experiment)."""
    champion = report["challenger_version"] if report["promoted"] else report["champion_version_before"]
    return {"promoted": report["promoted"], "challenger_version": report["challenger_version"],
            "champion_version": champion, "gates_failed": sum(not g["passed"] for g in report["gates"])}


def run_promote(params: Params) -> str:
    """Register the evaluated model as ``challenger``; make it ``champion`` if it passes the gates
    (promote.*): absolute ones on its test scores, and the paired comparison with the current
    champion on the same test slices (those the champion never trained on). Writes
    promote.report_path and logs the decision to the challenger's MLflow run. A refusal is an
    outcome, not an error; a version once rolled back is refused (a person decided against it)."""
    import mlflow

    from tumorscope import gates, registry, tracking
    from tumorscope.data.preprocess import load_classes, load_groups, load_split
    from tumorscope.data.split import read_split_table, rows_in_cache_order
    from tumorscope.inference import load_model_dir
    from tumorscope.models import evaluate as ev

    cfg = params.promote
    summary = _trained_model_summary(params)
    report_path = Path(params.evaluate.out_dir) / EVALUATION_REPORT
    if not report_path.is_file():
        raise UserError(f"{report_path} not found (run tumorscope evaluate first)")
    scores = read_json(report_path)
    challenger = load_model_dir(params.train.model_dir)
    classes = challenger.classes
    if load_classes(params.preprocess.cache_dir) != classes:
        raise UserError(f"{params.preprocess.cache_dir} holds other classes than the trained model: rerun tumorscope train")
    images, labels = load_split(params.preprocess.cache_dir, "test")
    groups = load_groups(params.preprocess.cache_dir, "test")

    tracking.configure(params.mlflow)
    client = mlflow.MlflowClient()
    version, run = _challenger_version(client, cfg, summary)
    label = f"{cfg.registered_model}/{version.version}"
    champion_version = registry.current_champion(cfg.registered_model)
    already = champion_version is not None and str(champion_version.version) == str(version.version)
    comparison = None
    champion_label = None
    if champion_version is not None and not already:
        champion = registry.load_model(cfg.registered_model, str(champion_version.version))
        champion_label = champion.version
        # The test rows of the split table, in the cache's order: their hashes, and the files for
        # a champion that prepares pixels another way.
        test_rows = rows_in_cache_order(read_split_table(params.split.path), classes, labels, ("test",),
                                        f"{params.split.path} vs {params.preprocess.cache_dir}")
        test_paths = test_rows["path"].tolist()
        unseen, basis = unseen_by_champion(params, client, champion_version.run_id, run, test_rows["phash"].to_numpy())
        if not unseen.any():
            raise UserError(f"promote: every test slice is near a slice {champion_label} trained on: no fair comparison")
        champion_probabilities = champion_test_probabilities(champion, challenger.spec, images, classes, test_paths)
        challenger_predicted = challenger.predict_proba(images).argmax(axis=1)[unseen]
        champion_predicted = champion_probabilities.argmax(axis=1)[unseen]
        kept_labels, kept_groups = labels[unseen], groups[unseen]
        comparison = ev.paired_group_bootstrap(kept_labels, challenger_predicted, champion_predicted, kept_groups,
                                               len(classes), params.evaluate.bootstrap_samples, params.evaluate.confidence,
                                               params.seed)
        comparison |= {"basis": basis, "n_slices": int(unseen.sum()), "n_left_out": int((~unseen).sum()),
                       "mcnemar": ev.mcnemar_exact(challenger_predicted == kept_labels, champion_predicted == kept_labels),
                       "champion_scores": ev.summary_scores(ev.score_predictions(
                           kept_labels, champion_probabilities[unseen], kept_groups, classes, params.evaluate, params.seed))}
        # The site's own patients: the same comparison on the test slices radiologists read.
        read = read_by_radiologists(test_paths, params.review.batch_prefix)[unseen]
        on_readings = {"n_slices": int(read.sum())}
        if read.any():
            on_readings |= ev.paired_group_bootstrap(kept_labels[read], challenger_predicted[read], champion_predicted[read],
                                                     kept_groups[read], len(classes), params.evaluate.bootstrap_samples,
                                                     params.evaluate.confidence, params.seed)
        comparison["on_readings"] = on_readings
    readings = gates.readings_gate((comparison or {}).get("on_readings"), cfg)
    checks = [*gates.absolute_gates(scores, cfg),
              gates.Gate("beats_champion", True, None, cfg.min_improvement, f"{label} is the champion") if already
              else gates.comparison_gate(comparison, cfg),
              *([readings] if readings is not None and not already else []),
              gates.rollback_gate(version)]
    promoted = all(g.passed for g in checks)
    line = (f"promote: {label} is already the champion; nothing to decide" if already and promoted
            else gates.decision_line(label, promoted, checks, champion_label))
    if promoted and not already:
        registry.make_champion(cfg.registered_model, str(version.version), line)
    client.set_model_version_tag(cfg.registered_model, str(version.version), "promotion_decision",
                                 "promoted" if promoted else "refused")
    # No run ids or times: the report is a DVC output and must repeat for the same models.
    report = {"registered_model": cfg.registered_model, "challenger_version": int(version.version),
              "champion_version_before": int(champion_version.version) if champion_version else None,
              "promoted": promoted, "already_champion": already, "decision": line, "gates": gates.gates_record(checks),
              "challenger_scores": ev.summary_scores(scores), "comparison": comparison,
              "thresholds": cfg.model_dump()}
    write_json(cfg.report_path, report)
    write_json(cfg.metrics_path, promotion_metrics(report))
    with mlflow.start_run(run_id=summary["run_id"]):
        mlflow.log_metrics({"promote_promoted": float(promoted), **{
            f"promote_gate_{g.name}": float(g.passed) for g in checks}}
            | ({"promote_macro_f1_difference": comparison["macro_f1_difference"],
                "promote_macro_f1_difference_low": comparison["low"],
                "promote_read_test_slices": float(comparison["on_readings"]["n_slices"])} if comparison else {})
            | ({"promote_macro_f1_difference_on_readings": comparison["on_readings"]["macro_f1_difference"]}
               if comparison and comparison["on_readings"]["n_slices"] else {}))
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



