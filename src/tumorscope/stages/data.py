"""One function per pipeline stage: read params, call the pure library, write the stage's outputs.

DVC stages (via the CLI) and Prefect flows both call these, so there is one code path. Each
returns a short human summary; a user mistake raises UserError with a one-line message.
"""

from __future__ import annotations

from pathlib import Path

from tumorscope.config import Params
from tumorscope.errors import UserError
from tumorscope.reports import read_json, write_json

INGEST_REPORT = "reports/ingest.json"
DATA_STAGES = ("phantom", "ingest", "manifest", "validate", "split", "preprocess")
TRAIN_REPORT = "train.json"


def run_phantom(params: Params) -> str:
    from tumorscope.data.phantom import generate_phantom

    index = generate_phantom(params.phantom, params.seed)
    counts = index["Class"].value_counts().sort_index().to_dict()
    return f"phantom: wrote {len(index)} slices to {params.phantom.out_dir} {counts}"


def run_ingest(params: Params) -> str:
    from tumorscope.data.ingest import ingest

    report = ingest(params.data)
    Path(INGEST_REPORT).parent.mkdir(parents=True, exist_ok=True)
    Path(INGEST_REPORT).write_text(report.to_json() + "\n")
    excluded = f", excluded folders {report.excluded_folders}" if report.excluded_folders else ""
    hidden = f", {len(report.skipped_hidden_files)} hidden files listed in {INGEST_REPORT}" if report.skipped_hidden_files else ""
    return f"ingest: {sum(report.files_per_label.values())} files {report.files_per_label} -> {params.data.raw_dir}{excluded}{hidden}"


def expected_classes() -> list[str]:
    if not Path(INGEST_REPORT).is_file():
        raise UserError(f"{INGEST_REPORT} not found (run the ingest stage first)")
    return sorted(read_json(INGEST_REPORT)["files_per_label"])


def run_manifest(params: Params) -> str:
    from tumorscope.data.manifest import build_manifest, check_every_class_readable, quarantine_table

    manifest = build_manifest(Path(params.data.raw_dir), params.data.dicom_window)
    Path(params.manifest.path).parent.mkdir(parents=True, exist_ok=True)
    manifest.to_csv(params.manifest.path, index=False)
    quarantined = quarantine_table(manifest)
    Path(params.manifest.quarantine_path).parent.mkdir(parents=True, exist_ok=True)
    quarantined.to_csv(params.manifest.quarantine_path, index=False)
    check_every_class_readable(manifest)  # after writing, so the quarantine report explains it
    note = f"; {len(quarantined)} unreadable file(s) quarantined, see {params.manifest.quarantine_path}" if len(quarantined) else ""
    return f"manifest: {len(manifest)} files, {int(manifest['readable'].sum())} readable{note}"


def run_validate(params: Params) -> str:
    from tumorscope.data.manifest import load_manifest
    from tumorscope.data.validate import validate_manifest

    outcome = validate_manifest(load_manifest(params.manifest.path), expected_classes(), params.validate_)
    if not outcome.success:
        raise UserError(f"{outcome.summary()} (details: {outcome.result_path})")
    return outcome.summary()


def run_split(params: Params) -> str:
    from tumorscope.data.manifest import load_manifest
    from tumorscope.data.split import make_split, split_report

    cfg = params.split
    fractions = {"train": cfg.train, "val": cfg.val, "test": cfg.test}
    manifest = load_manifest(params.manifest.path)
    table = make_split(manifest[manifest["readable"]], fractions, cfg.phash_threshold, params.seed)
    report = split_report(table, fractions, cfg.phash_threshold, cfg.tolerance)
    Path(cfg.path).parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(cfg.path, index=False)
    write_json(cfg.report_path, report)
    write_json(cfg.metrics_path, {k: report[k] for k in ("n_images", "n_groups", "largest_group", "cross_split_leaks")}
               | {"groups_spanning_classes": len(report["groups_spanning_classes"]), "unmet_targets": len(report["unmet_targets"])})
    if report["cross_split_leaks"]:
        raise UserError(f"split: {report['cross_split_leaks']} duplicate pairs straddle splits (bug); see {cfg.report_path}")
    sizes = {s: sum(c.values()) for s, c in report["counts"].items()}
    unmet = f"; WARNING {len(report['unmet_targets'])} unmet target(s): {report['unmet_targets'][0]}" if report["unmet_targets"] else ""
    return (f"split: {sizes}, {report['n_groups']} duplicate groups (largest {report['largest_group']}), "
            f"{report['cross_split_leaks']} leaks{unmet}")


def run_preprocess(params: Params) -> str:
    from tumorscope.data.preprocess import build_cache

    table = read_split_table(params)
    report = build_cache(table, sorted(table["label"].unique()), params.preprocess, params.data.dicom_window)
    write_json(params.preprocess.report_path, report)
    return f"preprocess: cache {report['counts']} at {params.preprocess.image_size}px in {params.preprocess.cache_dir}"


def model_options(cfg, seed: int) -> dict:
    """Keyword arguments of tumorscope.models.zoo.build_model for the configured architecture."""
    common = {"dense_units": cfg.dense_units, "dropout": cfg.dropout,
              "augment_strength": cfg.augment_strength_in("model"), "seed": seed}
    if cfg.architecture == "small_cnn":
        return common | {"filters": cfg.filters, "norm": cfg.norm}
    if cfg.weights is not None and not Path(cfg.weights).is_file():
        raise UserError(f"train.weights: weights file not found: {cfg.weights} (nothing is downloaded; "
                        "use null to train from scratch)")
    return common | {"weights": cfg.weights}


def uses_phantom(params: Params) -> bool:
    """Whether data.source is the embedded phantom's folder (so the phantom stage must run)."""
    return Path(params.data.source).resolve() == Path(params.phantom.out_dir).resolve()


def run_tune_worker(params: Params, worker_index: int = 0, trial_guard=None) -> str:
    """One Optuna worker on the configured study (created if missing); see tumorscope.tuning."""
    from tumorscope import tuning

    handle = tuning.open_study(params)
    counts = tuning.run_worker(params, handle, worker_index, trial_guard)
    return f"tune worker {worker_index}: study {handle.study_name!r} trial states {counts}"


def run_train_best(params: Params) -> str:
    """Train the tuned best configuration (reports/best_params.json over params.train) with the
    full budget (train.epochs), as a run nested under the study's MLflow parent run."""
    from tumorscope.config import with_overrides
    from tumorscope.tuning import read_best_params

    best = read_best_params(params)
    tuned = with_overrides(params, {"train": best["train"]})
    return run_train(tuned, parent_run_id=best["parent_run_id"], run_name=f"train-best-trial-{best['trial']}")


def run_train(params: Params, parent_run_id: str | None = None, run_name: str | None = None) -> str:
    import keras
    import mlflow

    from tumorscope import registry
    from tumorscope.data.preprocess import load_classes, load_split
    from tumorscope.models.evaluate import class_index
    from tumorscope.models.train import save_model, set_precision, train_model
    from tumorscope.models.zoo import build_model

    cfg = params.train
    keras.utils.set_random_seed(params.seed)
    precision = set_precision(cfg.precision)
    classes = load_classes(params.preprocess.cache_dir)
    train_data = load_split(params.preprocess.cache_dir, "train")
    val_data = load_split(params.preprocess.cache_dir, "val")
    model = build_model(cfg.architecture, params.preprocess.image_size, len(classes),
                        **model_options(cfg, params.seed))
    experiment_id = registry.configure(params.mlflow)
    nested = {"mlflow.parentRunId": parent_run_id} if parent_run_id else {}
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name or f"train-{cfg.architecture}",
                          tags=nested) as run:
        mlflow.set_tags(registry.run_tags(params) | {"stage": "train", "precision": precision})
        mlflow.log_params(registry.flatten({"seed": params.seed, "train": cfg.model_dump(),
                                            "preprocess": params.preprocess.model_dump(),
                                            "split": params.split.model_dump()}))
        mlflow.log_param("classes", ",".join(classes))
        result = train_model(model, train_data, val_data, cfg, params.seed, callbacks=[registry.epoch_logger()],
                             critical_index=class_index(classes, params.evaluate.critical_class))
        model_path = save_model(result.model, Path(cfg.model_dir))
        mlflow.log_artifact(str(model_path), artifact_path="model")
        mlflow.log_metrics({"epochs_run": result.epochs_run, "train_images_per_second": result.images_per_second})
        mlflow.log_param("effective_batch_size", result.batch_size)
        summary = {"run_id": run.info.run_id, "experiment_id": experiment_id, "architecture": cfg.architecture,
                   "classes": classes, "epochs_run": result.epochs_run, "fit_seconds": result.fit_seconds,
                   "train_images_per_second": result.images_per_second, "batch_size": result.batch_size,
                   "history": result.history}
        write_json(Path(cfg.model_dir) / TRAIN_REPORT, summary)
    return (f"train: {cfg.architecture} {result.epochs_run} epochs in {result.fit_seconds:.0f}s "
            f"({result.images_per_second:.0f} img/s), MLflow run {run.info.run_id}")


def headline_metrics(metrics: dict) -> dict:
    """The flat subset DVC shows and diffs: overall scores, their group-bootstrap intervals and
    per-class recall (a missed tumour is the costly error)."""
    keys = ("n_test", "accuracy", "macro_f1", "macro_roc_auc_ovr", "ece", "degenerate")
    headline = {**{k: metrics[k] for k in keys}, "recall": {c: v["recall"] for c, v in metrics["per_class"].items()}}
    intervals = metrics.get("intervals")
    if intervals:  # scalars, so that `dvc metrics show/diff` lists them
        headline["macro_f1_ci"] = {"low": intervals["macro_f1"]["low"], "high": intervals["macro_f1"]["high"]}
        headline["recall_ci_low"] = {c: r["low"] for c, r in intervals["recall"].items()}
    return headline


def read_split_table(params: Params):
    """split.csv as written by the split stage (labels kept as text: a class folder named "NA" or
    "None" stays a label, as the cache saw it)."""
    import pandas as pd

    if not Path(params.split.path).is_file():
        raise UserError(f"{params.split.path} not found (run tumorscope split and preprocess first)")
    return pd.read_csv(params.split.path, keep_default_na=False)


def cached_split_rows(table, params: Params, classes: list[str], labels, splits: tuple[str, ...]):
    """The split.csv rows of ``splits`` in the cache's order (split by split), checked against the
    cached labels: split.csv holds what the cache does not (paths, pHashes)."""
    import pandas as pd

    rows = pd.concat([table[table["split"] == split] for split in splits])
    if len(rows) != len(labels) or [classes[i] for i in labels] != rows["label"].tolist():
        raise UserError(f"{params.split.path} does not match the cache in {params.preprocess.cache_dir}: "
                        "rerun tumorscope preprocess")
    return rows


def accuracy_by_train_distance(params: Params, classes: list[str], labels, predicted) -> list[dict]:
    """Test accuracy in bands of pHash distance to the nearest training slice."""
    import numpy as np

    from tumorscope.data.split import nearest_distances
    from tumorscope.models.evaluate import accuracy_by_distance

    table = read_split_table(params)
    test = cached_split_rows(table, params, classes, labels, ("test",))
    distances = nearest_distances(test["phash"], table.loc[table["split"] == "train", "phash"])
    return accuracy_by_distance(np.asarray(labels) == np.asarray(predicted), distances,
                                params.evaluate.distance_bands)


def format_bands(bands: list[dict]) -> str:
    """'5-8: 0.86 (n=73), ...' over the bands that hold any slice."""
    return ", ".join(f"{b['distance']}: {b['accuracy']:.2f} (n={b['n']})" for b in bands if b["n"])


def add_intervals(metrics: dict, labels, probabilities, groups, classes: list[str], cfg, seed: int) -> dict:
    """Group-bootstrap intervals of macro-F1 and per-class recall on the test split."""
    from tumorscope.models.evaluate import group_bootstrap

    interval = group_bootstrap(labels, probabilities.argmax(axis=1), groups, len(classes), cfg.bootstrap_samples,
                               cfg.confidence, seed)
    interval["recall"] = dict(zip(classes, interval["recall"]))
    return metrics | {"intervals": interval}


def run_evaluate(params: Params) -> str:
    import keras
    import mlflow
    import numpy as np
    import pandas as pd

    from tumorscope import registry
    from tumorscope.data.preprocess import load_groups, load_split
    from tumorscope.models import evaluate as ev
    from tumorscope.models.train import predict_proba

    cfg = params.evaluate
    train_summary = read_json(Path(params.train.model_dir) / TRAIN_REPORT)
    classes = train_summary["classes"]
    model = keras.saving.load_model(Path(params.train.model_dir) / "model.keras")
    images, labels = load_split(params.preprocess.cache_dir, "test")
    probabilities = predict_proba(model, images)
    metrics = ev.compute_metrics(labels, probabilities, classes, cfg.calibration_bins, cfg.max_single_class_share)
    metrics = add_intervals(metrics, labels, probabilities, load_groups(params.preprocess.cache_dir, "test"),
                            classes, cfg, params.seed)
    metrics["accuracy_by_train_distance"] = accuracy_by_train_distance(params, classes, labels,
                                                                       probabilities.argmax(axis=1))

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    predicted = probabilities.argmax(axis=1)
    ev.plot_confusion(np.array(metrics["confusion_matrix"]), classes, out / "confusion_matrix.png")
    ev.plot_class_histogram(labels, predicted, classes, out / "class_histogram.png")
    ev.plot_reliability(metrics["reliability"], metrics["ece"], out / "reliability.png")
    pd.DataFrame({"actual": [classes[i] for i in labels], "predicted": [classes[i] for i in predicted]}).to_csv(
        out / "predictions.csv", index=False)
    write_json(out / "report.json", metrics)  # everything, incl. confusion matrix and reliability bins
    write_json(cfg.metrics_path, headline_metrics(metrics))

    registry.configure(params.mlflow)
    with mlflow.start_run(run_id=train_summary["run_id"]):
        flat = {"test_accuracy": metrics["accuracy"], "test_macro_f1": metrics["macro_f1"], "test_ece": metrics["ece"]}
        if metrics["macro_roc_auc_ovr"] is not None:
            flat["test_macro_roc_auc_ovr"] = metrics["macro_roc_auc_ovr"]
        flat.update({f"test_recall_{c}": v["recall"] for c, v in metrics["per_class"].items()})
        f1_interval = metrics["intervals"]["macro_f1"]
        if f1_interval["low"] is not None:
            flat.update({"test_macro_f1_ci_low": f1_interval["low"], "test_macro_f1_ci_high": f1_interval["high"]})
        mlflow.log_metrics(flat)
        mlflow.set_tag("degenerate", str(metrics["degenerate"]).lower())
        mlflow.log_artifact(cfg.metrics_path)
        mlflow.log_artifacts(str(out), artifact_path="evaluation")
    recalls = ", ".join(f"{c} {v['recall']:.2f}" for c, v in metrics["per_class"].items())
    f1_interval = metrics["intervals"]["macro_f1"]
    shown_interval = (f" [{f1_interval['low']:.3f}, {f1_interval['high']:.3f}] over {metrics['intervals']['n_groups']} groups"
                      if f1_interval["low"] is not None else "")
    line = (f"evaluate: accuracy {metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f}{shown_interval}, "
            f"ECE {metrics['ece']:.3f}; recall {recalls}")
    if metrics["degenerate"] and cfg.fail_on_degenerate:
        raise UserError(f"{line} -- DEGENERATE MODEL: {metrics['degenerate_reason']}")
    return (f"{line}\nevaluate: accuracy by pHash distance to the nearest training slice: "
            f"{format_bands(metrics['accuracy_by_train_distance'])}")


def load_cached_dataset(cache_dir: str) -> tuple:
    """Every cached image of every split, in memory: (images, labels, duplicate-group ids)."""
    import numpy as np

    from tumorscope.data.preprocess import load_groups, load_split
    from tumorscope.data.split import SPLITS

    parts = [load_split(cache_dir, split, mmap=False) for split in SPLITS]
    return (np.concatenate([images for images, _ in parts]), np.concatenate([labels for _, labels in parts]),
            np.concatenate([load_groups(cache_dir, split) for split in SPLITS]))


def crossval_summary_line(report: dict, critical_class: str) -> str:
    def spread(summary: dict) -> str:
        if summary["mean"] is None:
            return "n/a"
        return f"mean {summary['mean']:.3f} (sd {summary['std']:.3f}, {summary['min']:.3f}-{summary['max']:.3f})"

    pooled = report["pooled"]
    interval = pooled["macro_f1_ci"]
    shown = f" [{interval['low']:.3f}, {interval['high']:.3f}]" if interval["low"] is not None else ""
    per_fold = ", ".join(f"{r['macro_f1']:.2f}" for r in report["rounds"])
    return (f"crossval: {report['folds']} grouped folds of {report['n_images']} images ({report['architecture']}): "
            f"macro-F1 {spread(report['macro_f1'])}; {critical_class} recall {spread(report['critical_recall'])}; "
            f"pooled out-of-fold macro-F1 {pooled['macro_f1']:.3f}{shown}; per fold {per_fold}\n"
            "crossval: out-of-fold accuracy by pHash distance to the nearest training slice: "
            f"{format_bands(report['accuracy_by_train_distance'])}")


def run_crossval(params: Params) -> str:
    """Grouped k-fold cross-validation of train.* (or the tuned configuration) on the cache: each
    image is tested once by a model that never saw its duplicate group. Writes crossval.report_path
    and one MLflow parent run with a nested run per fold."""
    import numpy as np

    from tumorscope.config import with_overrides
    from tumorscope.data.preprocess import load_classes
    from tumorscope.data.split import SPLITS, grouped_folds, nearest_distances
    from tumorscope.models.crossval import fold_roles, summarise_rounds
    from tumorscope.models.evaluate import accuracy_by_distance, class_index
    from tumorscope.tuning import flat_scores, read_best_params, score_predictions

    cv = params.crossval
    if cv.use_best_params:
        params = with_overrides(params, {"train": read_best_params(params)["train"]})
    cfg = params.train
    classes = load_classes(params.preprocess.cache_dir)
    images, labels, groups = load_cached_dataset(params.preprocess.cache_dir)
    hashes = cached_split_rows(read_split_table(params), params, classes, labels, SPLITS)["phash"].to_numpy()
    folds = grouped_folds(labels, groups, cv.folds, params.seed)
    empty = [fold for fold in range(cv.folds) if not np.any(folds == fold)]
    if empty:
        raise UserError(f"crossval.folds: {cv.folds} folds but only {len(np.unique(groups))} duplicate groups; "
                        f"fold(s) {empty} would be empty: use fewer folds")
    # Checked before TensorFlow loads, so that a user mistake answers at once.
    import keras
    import mlflow

    from tumorscope import registry
    from tumorscope.models.train import fresh_session, predict_proba, set_precision, train_model
    from tumorscope.models.zoo import build_model

    critical = class_index(classes, params.evaluate.critical_class)
    precision = set_precision(cfg.precision)
    out_of_fold = np.zeros((len(labels), len(classes)), dtype=np.float32)
    train_distance = np.zeros(len(labels), dtype=np.int64)  # test slice -> nearest training slice of its round
    rounds = []
    experiment_id = registry.configure(params.mlflow)
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"crossval-{cfg.architecture}-{cv.folds}fold") as parent:
        mlflow.set_tags(registry.run_tags(params) | {"stage": "crossval", "precision": precision})
        mlflow.log_params(registry.flatten({"seed": params.seed, "train": cfg.model_dump(),
                                            "crossval": cv.model_dump(), "split.phash_threshold": params.split.phash_threshold,
                                            "preprocess.image_size": params.preprocess.image_size}))
        for fold in range(cv.folds):
            roles = fold_roles(folds, fold, cv.folds)
            fresh_session()
            keras.utils.set_random_seed(params.seed)
            model = build_model(cfg.architecture, params.preprocess.image_size, len(classes),
                                **model_options(cfg, params.seed))
            with mlflow.start_run(experiment_id=experiment_id, run_name=f"crossval-fold-{fold}", nested=True):
                mlflow.set_tags(registry.run_tags(params) | {"stage": "crossval-fold", "fold": str(fold)})
                result = train_model(model, (images[roles["train"]], labels[roles["train"]]),
                                     (images[roles["val"]], labels[roles["val"]]), cfg, params.seed,
                                     callbacks=[registry.epoch_logger()], critical_index=critical)
                probabilities = predict_proba(result.model, images[roles["test"]])
                out_of_fold[roles["test"]] = probabilities
                train_distance[roles["test"]] = nearest_distances(hashes[roles["test"]], hashes[roles["train"]])
                scores = score_predictions(labels[roles["test"]], probabilities, groups[roles["test"]], classes, params)
                mlflow.log_metrics(flat_scores(scores, "test_") | {"epochs_run": result.epochs_run})
            rounds.append({"fold": fold, **{f"n_{role}": int(mask.sum()) for role, mask in roles.items()},
                           "test_groups": int(len(np.unique(groups[roles["test"]]))),
                           "test_counts": {c: int(np.sum(labels[roles["test"]] == i)) for i, c in enumerate(classes)},
                           "epochs_run": result.epochs_run, **scores})
        pooled = score_predictions(labels, out_of_fold, groups, classes, params)
        report = {"folds": cv.folds, "n_images": int(len(labels)), "n_groups": int(len(np.unique(groups))),
                  "phash_threshold": params.split.phash_threshold, "image_size": params.preprocess.image_size,
                  "architecture": cfg.architecture, "train": cfg.model_dump(), "classes": classes,
                  "critical_class": params.evaluate.critical_class,
                  "macro_f1": summarise_rounds(rounds, "macro_f1"),
                  "critical_recall": summarise_rounds(rounds, "critical_recall"),
                  "degenerate_folds": [r["fold"] for r in rounds if r["degenerate"]],
                  "pooled": pooled, "rounds": rounds, "mlflow_run_id": parent.info.run_id,
                  "accuracy_by_train_distance": accuracy_by_distance(out_of_fold.argmax(axis=1) == labels,
                                                                     train_distance, params.evaluate.distance_bands)}
        write_json(cv.report_path, report)
        mlflow.log_metrics({f"cv_macro_f1_{k}": v for k, v in report["macro_f1"].items() if v is not None}
                           | {f"cv_critical_recall_{k}": v for k, v in report["critical_recall"].items() if v is not None}
                           | flat_scores(pooled, "pooled_"))
        mlflow.log_artifact(cv.report_path)
    return crossval_summary_line(report, params.evaluate.critical_class)
