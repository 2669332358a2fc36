"""The model stages after tuning (``stages.tuning``): train, evaluate and cross-validate. Params in,
the stage's files out, one MLflow run per training.

Every training goes through ``models.train.fit_and_score`` and every score through
``models.evaluate.score_predictions``, logged by ``tracking.log_fit``: the train stage, a trial
and a fold differ only in what they train on and what they score.
"""

from __future__ import annotations

from pathlib import Path

from tumorscope.artifacts import EVALUATION_REPORT, MODEL_FILE, TRAIN_BACKUP_DIR, TRAIN_HISTORY, TRAIN_REPORT
from tumorscope.config import Params
from tumorscope.errors import UserError
from tumorscope.models.evaluate import format_interval
from tumorscope.reports import read_json, write_json

BASELINE_DIR = "baseline"


# ---------------------------------------------------------------------------------------------
# Train


def run_train(params: Params, baseline: bool = False) -> str:
    """Train what the DVC ``train`` stage trains: the tuned best configuration (tune.best_params_path
    over train.*) for the full budget, as a run nested under the study's MLflow run, into
    train.model_dir. ``baseline``: params.yaml's train.* untouched, into train.model_dir/baseline,
    so the untuned model never overwrites the one DVC tracks."""
    from tumorscope.config import with_overrides
    from tumorscope.tuning.leaderboard import read_best_params
    from tumorscope.tuning.study import find_parent_run

    if baseline:
        return train_and_save(params, Path(params.train.model_dir) / BASELINE_DIR, run_name="train-baseline",
                              parent_run_id=None, trained="baseline (params.yaml train.*)")
    best = read_best_params(params)
    tuned = with_overrides(params, {"train": best["train"]})
    if best["study_name"] is None:  # tune.n_trials 0: no study to nest under
        return train_and_save(tuned, Path(params.train.model_dir), run_name="train-fixed", parent_run_id=None,
                              trained="params.yaml train.* (tune.n_trials 0: no study)")
    parent_run_id = find_parent_run(params)  # the study is identified by the untuned params
    return train_and_save(tuned, Path(params.train.model_dir), run_name=f"train-best-trial-{best['trial']}",
                          parent_run_id=parent_run_id, trained=f"best trial {best['trial']} of {best['study_name']}")


def write_history(history: dict[str, list[float]], path: Path) -> Path:
    """Per-epoch metrics as a TSV (epoch, then one column per metric, sorted): the learning curves
    ``dvc plots show`` draws (a metric recorded in fewer epochs is left empty after its last)."""
    import pandas as pd

    frame = pd.DataFrame({key: pd.Series(history[key], dtype=float) for key in sorted(history)})
    frame.insert(0, "epoch", range(1, len(frame) + 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, sep="\t", index=False, float_format="%.6g")
    return path


def train_and_save(params: Params, model_dir: Path, run_name: str, parent_run_id: str | None, trained: str) -> str:
    """Fit train.* on the train split (validation for early stopping, then scored), save the
    ``.keras`` file and train.json, log the run (params, epochs, scores, model) to MLflow."""
    import mlflow

    from tumorscope import registry, tracking
    from tumorscope.data.preprocess import load_classes, load_groups, load_split
    from tumorscope.inference import input_spec
    from tumorscope.models.resume import TrainingBackup
    from tumorscope.models.saving import save_model
    from tumorscope.models.train import fit_and_score
    from tumorscope.trust.answers import fit_trust

    cfg, cache = params.train, params.preprocess.cache_dir
    classes = load_classes(cache)
    val_images, val_labels = load_split(cache, "val")
    val_groups = load_groups(cache, "val")
    experiment_id = tracking.configure(params.mlflow)
    # A killed train stage run again resumes after its last finished epoch, if nothing it trains on changed.
    fingerprint = tracking.training_fingerprint(params, cfg, classes)
    # CPU, memory (and GPU where there is one) beside the learning curves: the long fit, not the trials.
    with tracking.start_training_run(params, experiment_id, run_name, "train", parent_run_id,
                                     system_metrics=True) as run:
        tracking.log_split_datasets(params)
        if cfg.ensemble_members == 1:
            backup = TrainingBackup(TRAIN_BACKUP_DIR, fingerprint)
            resumed = backup.state()
            if resumed is not None:
                mlflow.set_tag("resumed_from_epoch", str(resumed["epochs_done"]))
            outcome = fit_and_score(cfg, params.preprocess.image_size, classes, params.seed, load_split(cache, "train"),
                                    (val_images, val_labels), (val_images, val_labels, val_groups),
                                    params.evaluate, callbacks=[tracking.epoch_logger()], backup=backup,
                                    init_weights=cfg.init_weights)
            ensemble = None
        else:
            outcome, ensemble = fit_ensemble(params, classes, (val_images, val_labels, val_groups),
                                             Path(TRAIN_BACKUP_DIR) / "ensemble", fingerprint)
            mlflow.log_metrics({f"member_{i}.final_val_macro_f1": f1
                                for i, f1 in enumerate(ensemble["member_val_macro_f1"])})
        tracking.log_fit(params, cfg, outcome, "final_val_")
        mlflow.log_param("classes", ",".join(classes))
        model_path = save_model(outcome.result.model, model_dir)
        spec = input_spec(classes, params.preprocess, params.data.dicom_window)
        # Calibration, conformal thresholds and the out-of-distribution check, fitted on validation
        # (and training) slices only, travel with the model: train.json and the MLflow model.
        trust = fit_trust(outcome.result.model, load_split(cache, "train"), (val_images, val_labels, val_groups),
                          len(classes), params.conformal, params.ood, load_groups(cache, "train"), params.audit.min_series,
                          params.seed)
        mlflow.log_metrics({"temperature": trust["temperature"],
                            "val_nll_before_scaling": trust["validation_nll"]["before"],
                            "val_nll_after_scaling": trust["validation_nll"]["after"]})
        weights = pretrained_provenance(cfg.weights)
        if weights:
            mlflow.set_tags({f"pretrained_weights.{key}": value for key, value in weights.items()})
        logged_uri = registry.log_model(outcome.result.model, spec, val_images[:2], trust, weights)
        # The split it trained on: promotion compares a later model only on slices this one never saw.
        mlflow.log_artifact(params.split.path, artifact_path="data")
    result = outcome.result
    # No wall-clock times here: this file is a DVC output (they are on the MLflow run).
    write_json(model_dir / TRAIN_REPORT, {
        "run_id": run.info.run_id, "experiment_id": experiment_id, "model_uri": logged_uri, "input_spec": spec,
        "trained": trained,
        "architecture": cfg.architecture, "classes": classes, "epochs_run": result.epochs_run,
        "batch_size": result.batch_size, "val_macro_f1": outcome.scores["macro_f1"], "history": result.history,
        "pretrained_weights": weights, "ensemble": ensemble,
        "trust": trust})
    write_history(result.history, model_dir / TRAIN_HISTORY)
    members = "" if ensemble is None else (
        f"an ensemble of {cfg.ensemble_members} (seeds {ensemble['seeds'][0]}-{ensemble['seeds'][-1]}, validation "
        f"macro-F1 {', '.join(f'{v:.3f}' for v in ensemble['member_val_macro_f1'])} alone), ")
    return (f"train: {trained}: {members}{cfg.architecture} {result.epochs_run} epochs in {result.fit_seconds:.0f}s "
            f"({result.images_per_second:.0f} img/s), validation macro-F1 {outcome.scores['macro_f1']:.3f}; "
            f"{model_path}, MLflow run {run.info.run_id}")


def fit_ensemble(params: Params, classes: list[str], scored, backup_dir: Path, fingerprint: str):
    """train.ensemble_members models of train.* (seeds seed, seed + 1, ...) combined into one
    (``models.ensemble.combine``) and scored on ``scored`` like a single fit: (its FitOutcome, a
    summary for train.json). Each member logs its epochs under ``member_<i>.`` (the first under
    plain names, as a single model would); a kill resumes the member it was training, and the
    members that had finished are read back from ``backup_dir``."""
    import shutil

    import keras

    from tumorscope import tracking
    from tumorscope.data.preprocess import load_split
    from tumorscope.inference import predict_proba
    from tumorscope.models.ensemble import combine
    from tumorscope.models.evaluate import score_predictions
    from tumorscope.models.resume import TrainingBackup
    from tumorscope.models.saving import save_model
    from tumorscope.models.train import FitOutcome, TrainResult, fit_and_score

    cfg, cache = params.train, params.preprocess.cache_dir
    images, labels, groups = scored
    models, results, scores = [], [], []
    precision: str = cfg.precision
    for index in range(cfg.ensemble_members):
        finished = backup_dir / f"finished-{index}"
        summary = read_json(finished / "member.json") if (finished / "member.json").is_file() else None
        member_fingerprint = f"{fingerprint}-member-{index}"
        if summary is not None and summary["fingerprint"] == member_fingerprint:
            model = keras.saving.load_model(finished / MODEL_FILE)
            result = TrainResult(model, **summary["result"])
            member_f1, precision = summary["val_macro_f1"], summary["precision"]
        else:
            prefix = "" if index == 0 else f"member_{index}."
            outcome = fit_and_score(cfg, params.preprocess.image_size, classes, params.seed + index,
                                    load_split(cache, "train"), (images, labels), scored, params.evaluate,
                                    callbacks=[tracking.epoch_logger(prefix)],
                                    backup=TrainingBackup(backup_dir / f"member-{index}", member_fingerprint))
            model, result = outcome.result.model, outcome.result
            member_f1, precision = outcome.scores["macro_f1"], outcome.precision
            save_model(model, finished)  # the model file first: the summary names a finished member
            write_json(finished / "member.json", {
                "fingerprint": member_fingerprint, "val_macro_f1": member_f1, "precision": precision,
                "result": {"history": result.history, "epochs_run": result.epochs_run, "fit_seconds": result.fit_seconds,
                           "images_per_second": result.images_per_second, "batch_size": result.batch_size}})
        models.append(model)
        results.append(result)
        scores.append(member_f1)
    ensemble = combine(models)
    probabilities = predict_proba(ensemble, images, test_time_augmentation=params.evaluate.test_time_augmentation)
    # The first member's curves under their plain names (the learning curves DVC plots), the others' prefixed.
    history = dict(results[0].history) | {f"member_{i}.{key}": values for i, r in enumerate(results[1:], start=1)
                                          for key, values in r.history.items()}
    seconds = sum(r.fit_seconds for r in results)
    epochs = sum(r.epochs_run for r in results)
    result = TrainResult(ensemble, history, epochs, seconds, sum(r.images_per_second * r.fit_seconds for r in results)
                         / max(seconds, 1e-9), results[0].batch_size)
    outcome = FitOutcome(result, precision, probabilities,
                         score_predictions(labels, probabilities, groups, classes, params.evaluate, params.seed))
    shutil.rmtree(backup_dir, ignore_errors=True)
    return outcome, {"members": cfg.ensemble_members, "seeds": [params.seed + i for i in range(cfg.ensemble_members)],
                     "member_val_macro_f1": scores, "member_epochs": [r.epochs_run for r in results],
                     "combined": "mean of the members' logits (tumorscope.models.ensemble)"}


# ---------------------------------------------------------------------------------------------
# Evaluate


def pretrained_provenance(weights: str | None) -> dict[str, str] | None:
    """Package, version, licence and source of installed-package weights (None for other weights)."""
    from tumorscope.models.pretrained import package_spec, provenance

    return provenance(weights) if weights and package_spec(weights) else None


def accuracy_by_train_distance(params: Params, classes: list[str], labels, predicted) -> list[dict]:
    """Test accuracy in bands of pHash distance to the nearest training slice."""
    import numpy as np

    from tumorscope.data.split import nearest_distances, read_split_table, rows_in_cache_order
    from tumorscope.models.evaluate import accuracy_by_distance

    table = read_split_table(params.split.path)
    test = rows_in_cache_order(table, classes, labels, ("test",), f"{params.split.path} vs {params.preprocess.cache_dir}")
    distances = nearest_distances(test["phash"], table.loc[table["split"] == "train", "phash"])
    return accuracy_by_distance(np.asarray(labels) == np.asarray(predicted), distances,
                                params.evaluate.distance_bands)


def format_bands(bands: list[dict]) -> str:
    """'5-8: 0.86 (n=73), ...' over the bands that hold any slice."""
    return ", ".join(f"{b['distance']}: {b['accuracy']:.2f} (n={b['n']})" for b in bands if b["n"])


def _value_or_dash(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def run_evaluate(params: Params) -> str:
    """Score the trained model on the test split: report.json, metrics.json (DVC metrics), plots,
    and the test scores on the model's MLflow run."""
    import keras
    import mlflow
    import numpy as np
    import pandas as pd

    from tumorscope import tracking
    from tumorscope.data.audit import mask_body
    from tumorscope.data.preprocess import load_groups, load_split
    from tumorscope.models import evaluate as ev
    from tumorscope.models.shortcuts import shortcut_audit, shortcut_line, shortcut_metrics
    from tumorscope.monitoring.features import feature_model, model_outputs
    from tumorscope.trust.answers import judge
    from tumorscope.trust.assessment import flat_trust_scores, risk_coverage, trust_headline, trust_scores

    cfg = params.evaluate
    report_path = Path(params.train.model_dir) / TRAIN_REPORT
    if not report_path.is_file():
        raise UserError(f"{report_path} not found (run tumorscope train first)")
    train_summary = read_json(report_path)
    classes = train_summary["classes"]
    model = keras.saving.load_model(Path(params.train.model_dir) / MODEL_FILE)
    images, labels = load_split(params.preprocess.cache_dir, "test")
    groups = load_groups(params.preprocess.cache_dir, "test")
    state = train_summary.get("trust")
    if state is None:
        raise UserError(f"{report_path} has no trust state (calibration, conformal sets): run tumorscope train again")
    with_features = feature_model(model)
    probabilities, embeddings = model_outputs(model, images, state["ood"]["embedding_dims"], with_features=with_features)
    judged = judge(probabilities, embeddings, images, classes, state)
    scores = ev.score_predictions(labels, probabilities, groups, classes, cfg, params.seed)
    scores["trust"] = trust_scores(labels, probabilities, judged, groups, classes, state, cfg, params.seed)
    # Has it learnt a finding or the acquisition? Baselines on the same split, the body masked out.
    masked_probabilities, _ = model_outputs(model, mask_body(images), state["ood"]["embedding_dims"],
                                            with_features=with_features)
    scores["shortcuts"] = shortcut_audit(load_split(params.preprocess.cache_dir, "train"), (images, labels, groups),
                                         probabilities, masked_probabilities, classes, params.audit.thumbnail_size,
                                         cfg, params.seed)
    predicted = probabilities.argmax(axis=1)
    bands = accuracy_by_train_distance(params, classes, labels, predicted)

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ev.plot_confusion(np.array(scores["confusion_matrix"]), classes, out / "confusion_matrix.png")
    ev.plot_class_histogram(labels, predicted, classes, out / "class_histogram.png")
    ev.plot_reliability(scores["reliability"], scores["ece"], out / "reliability.png")
    calibration = scores["trust"]["calibration"]
    ev.plot_reliability(calibration["reliability_after"], calibration["ece_after"]["value"],
                        out / "reliability_calibrated.png",
                        title=f"Reliability after temperature scaling (T = {calibration['temperature']:.2f})")
    pd.DataFrame({"actual": [classes[i] for i in labels], "predicted": [classes[i] for i in predicted]}).to_csv(
        out / "predictions.csv", index=False)
    pd.DataFrame(risk_coverage(labels, judged.probabilities)).to_csv(out / "risk_coverage.csv", index=False)
    write_json(out / EVALUATION_REPORT, scores | {"accuracy_by_train_distance": bands})
    write_json(cfg.metrics_path, ev.headline_metrics(scores) | trust_headline(scores.get("trust"))
               | {"shortcuts": shortcut_metrics(scores["shortcuts"])})

    tracking.configure(params.mlflow)
    with mlflow.start_run(run_id=train_summary["run_id"]):
        mlflow.log_metrics(ev.flat_scores(scores, "test_") | flat_trust_scores(scores["trust"], "test_")
                           | {f"test_shortcuts.{k}": float(v) for k, v in  # type: ignore[arg-type]
                              tracking.flatten(shortcut_metrics(scores["shortcuts"])).items() if v is not None})
        mlflow.set_tag("degenerate", str(scores["degenerate"]).lower())
        mlflow.log_artifact(cfg.metrics_path)
        mlflow.log_artifacts(str(out), artifact_path="evaluation")
    recalls = ", ".join(f"{c} {v:.2f}" for c, v in scores["recall"].items())
    line = (f"evaluate: accuracy {scores['accuracy']:.3f}, macro-F1 {scores['macro_f1']:.3f}"
            f"{format_interval(scores['macro_f1_ci'])} over {scores['n_groups']} groups, "
            f"ECE {scores['ece']:.3f} ({calibration['ece_after']['value']:.3f} calibrated); recall {recalls}")
    conformal, referral = scores["trust"]["conformal"], scores["trust"]["referral"]
    trust_line = (f"evaluate: prediction sets cover {conformal['coverage']['value']:.3f} of test slices "
                  f"(target {conformal['target_coverage']:.2f}), mean size {conformal['mean_set_size']:.2f}; "
                  f"referred {referral['referred']['value']:.3f}, accuracy on the rest "
                  f"{_value_or_dash(referral['selective_accuracy']['value'])}")
    if scores["degenerate"] and cfg.fail_on_degenerate:
        raise UserError(f"{line} -- DEGENERATE MODEL: {scores['degenerate_reason']}")
    return (f"{line}\n{trust_line}\nevaluate: {shortcut_line(scores['shortcuts'])}\n"
            f"evaluate: accuracy by pHash distance to the nearest training slice: {format_bands(bands)}")
