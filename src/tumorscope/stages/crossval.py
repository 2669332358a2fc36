"""Cross-validation (not a DVC stage: k trainings): grouped k-fold of train.* on the cache, and with
``cross_source.path`` another export's slices of each fold's held-out series scored too."""

from __future__ import annotations

import time

import numpy as np

from tumorscope.config import Params
from tumorscope.errors import UserError
from tumorscope.models.evaluate import format_interval
from tumorscope.reports import write_json
from tumorscope.stages.training import format_bands


def crossval_summary_line(report: dict, critical_class: str) -> str:
    def spread(summary: dict) -> str:
        if summary["mean"] is None:
            return "n/a"
        return f"mean {summary['mean']:.3f} (sd {summary['std']:.3f}, {summary['min']:.3f}-{summary['max']:.3f})"

    pooled = report["pooled"]
    per_fold = ", ".join(f"{r['macro_f1']:.2f}" for r in report["rounds"])
    return (f"crossval: {report['folds']} grouped folds of {report['n_images']} images ({report['architecture']}): "
            f"macro-F1 {spread(report['macro_f1'])}; {critical_class} recall {spread(report['critical_recall'])}; "
            f"pooled out-of-fold macro-F1 {pooled['macro_f1']:.3f}{format_interval(pooled['macro_f1_ci'])}; "
            f"per fold {per_fold}\n"
            "crossval: out-of-fold accuracy by pHash distance to the nearest training slice: "
            f"{format_bands(report['accuracy_by_train_distance'])}"
            + "".join(f"\ncrossval: {where}: {held_out_line(report[where], critical_class)}"
                      for where in ("in_source", "cross_source") if report.get(where, {}).get("n"))
            + "".join(f"\ncrossval: {where}: the model {baseline_verdicts(found)}"
                      for where, found in report.get("acquisition_baselines", {}).items())
            + "".join(f"\ncrossval: {where}: {referral_line(found)}" for where, found in report.get("referral", {}).items()))


def referral_line(referral: dict) -> str:
    """'decides 37 % [..] at accuracy 0.91 [..] (all: 0.59); referred: 12 features, 3 orientation'."""
    decided, accuracy = referral["decided"], referral["selective_accuracy"]
    because = ", ".join(f"{n} {kind}" for kind, n in referral["referred_because"].items() if n)
    shown = "-" if accuracy["value"] is None else f"{accuracy['value']:.3f}{format_interval(accuracy)}"
    share = (f"{decided['value']:.0%}" + (f" [{decided['low']:.0%}, {decided['high']:.0%}]"
                                          if decided.get("low") is not None else ""))
    return (f"the referral decides {share} of slices, at accuracy {shown} "
            f"(all answers: {referral['accuracy_all']['value']:.3f}); referred because: {because or 'none referred'}")


def held_out_line(scores: dict, critical_class: str) -> str:
    """'macro-F1 0.59 [..], Tumor recall .., ECE .. (n slices, g series); axial .., coronal ..'."""
    def one(part: dict) -> str:
        recall = "-" if part["critical_recall"] is None else f"{part['critical_recall']:.3f}"
        ece = "-" if part["ece"] is None else f"{part['ece']:.3f}"
        return (f"macro-F1 {part['macro_f1']:.3f}{format_interval(part['macro_f1_ci'])}, {critical_class} recall "
                f"{recall}, ECE {ece} ({part['n']} slices, {part['n_groups']} series)")

    orientations = "; ".join(f"{o}: {one(part)}" for o, part in scores.get("by_orientation", {}).items())
    return f"{one(scores)}; by orientation {orientations}"


def baseline_verdicts(found: dict) -> str:
    """'beats intensity (+0.12 [+0.05, +0.20]), does NOT beat thumbnail (...)'."""
    return ", ".join(
        f"{'beats' if b['model_beats'] else 'does NOT beat'} the {name} baseline {b['macro_f1']:.3f} "
        f"({b['model_minus_baseline']['macro_f1_difference']:+.3f} [{b['model_minus_baseline']['low']:+.3f}, "
        f"{b['model_minus_baseline']['high']:+.3f}])" for name, b in found.items())


def require_cache(params: Params) -> list[str]:
    """The cache's classes, or one line saying to build it first (crossval and ablate read it whole)."""
    from pathlib import Path

    from tumorscope.data.preprocess import load_classes

    cache = Path(params.preprocess.cache_dir)
    if not (cache / "classes.json").is_file():
        raise UserError(f"{cache} has no cache: run the data stages first (dvc repro preprocess)")
    return load_classes(cache)


def load_held_out(params: Params, classes: list[str], labels, groups, folds):
    """The other source's slices (``cross_source.path``) tied to the training source's series and
    folds (``tumorscope.data.cross_source``), or None when none is configured."""
    from pathlib import PurePath

    from tumorscope.data.cross_source import held_out_slices
    from tumorscope.data.split import SPLITS, read_split_table, rows_in_cache_order

    cfg = params.cross_source
    if not cfg.path:
        return None
    rows = rows_in_cache_order(read_split_table(params.split.path), classes, labels, SPLITS,
                               f"{params.split.path} vs {params.preprocess.cache_dir}")
    names = [f"{label}/{PurePath(path).name}" for label, path in zip(rows["label"], rows["path"], strict=True)]
    return held_out_slices(cfg.path, classes, params.data.image_extensions, params.data.dicom_window, names,
                           rows["phash"].tolist(), groups, folds, cfg.phash_distance, params.split.phash_threshold)


def shortcut_comparisons(params: Params, classes: list[str], data: tuple, out_of_fold, held_out, cross_images,
                         cross_out_of_fold) -> dict:
    """The acquisition-only baselines on the same folds, compared with the model in-source and,
    with another source, across exports (paired over series)."""
    from tumorscope.models.shortcuts import compare_with_baselines, fold_baselines

    images, labels, groups, folds = data
    baselines = fold_baselines(images, labels, folds, cross_images, None if held_out is None else held_out.folds,
                               len(classes), params.audit.thumbnail_size, params.seed)
    out = {"in_source": compare_with_baselines(labels, out_of_fold, {n: b[0] for n, b in baselines.items()}, groups,
                                               classes, params.evaluate, params.seed)}
    if held_out is not None:
        out["cross_source"] = compare_with_baselines(held_out.source.labels, cross_out_of_fold,
                                                     {n: b[1] for n, b in baselines.items() if b[1] is not None},
                                                     held_out.series,
                                                     classes, params.evaluate, params.seed)
    return out


def fold_referrals(params: Params, classes: list[str], model, roles: dict, data: tuple, sources: dict,
                   to_judge: dict[str, np.ndarray]) -> dict[str, list[str | None]]:
    """The referral reasons (None: decided) of one fold's model for the slices ``to_judge`` of each
    source, with a trust state fitted on the fold's training and validation slices."""
    from tumorscope.monitoring.features import feature_model, model_outputs
    from tumorscope.trust.answers import fit_trust, judge

    images, labels, groups = data
    train, val = roles["train"], roles["val"]
    state = fit_trust(model, (images[train], labels[train]), (images[val], labels[val], groups[val]), len(classes),
                      params.conformal, params.ood, groups[train], params.audit.min_series, params.seed)
    with_features = feature_model(model)
    out: dict[str, list[str | None]] = {}
    for name, index in to_judge.items():
        if not len(index):
            out[name] = []
            continue
        slices = np.asarray(sources[name][index])
        probabilities, embeddings = model_outputs(model, slices, state["ood"]["embedding_dims"],
                                                  with_features=with_features)
        out[name] = judge(probabilities, embeddings, slices, classes, state).reasons
    return out


def referral_report(params: Params, classes: list[str], labels: np.ndarray, probabilities: np.ndarray,
                    groups: np.ndarray, reasons: list[str | None]) -> dict:
    """``trust.assessment.referral_scores`` of out-of-fold answers (series-bootstrap intervals) with the
    critical class's recall among the decided ones."""
    from types import SimpleNamespace

    from tumorscope.models.evaluate import class_index
    from tumorscope.trust.assessment import GroupBootstrap, referral_scores

    refer = np.array([r is not None for r in reasons], dtype=bool)
    bootstrap = GroupBootstrap(groups, params.evaluate.bootstrap_samples, params.evaluate.confidence, params.seed)
    scores = referral_scores(labels, SimpleNamespace(refer=refer, probabilities=probabilities, reasons=reasons),
                             bootstrap)
    decided_critical = None
    critical = class_index(classes, params.evaluate.critical_class)
    if critical is not None:
        hits = (probabilities.argmax(axis=1) == labels) & (labels == critical)
        decided_critical = bootstrap.mean(hits, (labels == critical) & ~refer)
    return scores | {"decided": bootstrap.mean(~refer), "critical_recall_decided": decided_critical}


def run_crossval(params: Params) -> str:
    """Grouped k-fold cross-validation of train.* (or the tuned configuration) on the cache: each
    image is tested once by a model that never saw its duplicate group. Writes crossval.report_path
    and one MLflow parent run with a nested run per fold."""
    import numpy as np

    from tumorscope.config import with_overrides
    from tumorscope.data.preprocess import load_cached_dataset
    from tumorscope.data.split import SPLITS, grouped_folds, nearest_distances, read_split_table, rows_in_cache_order
    from tumorscope.models.crossval import fold_roles, summarise_rounds
    from tumorscope.models.evaluate import accuracy_by_distance, flat_scores, score_predictions, summary_scores
    from tumorscope.tuning.leaderboard import read_best_params

    cv = params.crossval
    if cv.use_best_params:
        params = with_overrides(params, {"train": read_best_params(params)["train"]})
    cfg = params.train
    classes = require_cache(params)
    images, labels, groups = load_cached_dataset(params.preprocess.cache_dir)
    hashes = rows_in_cache_order(read_split_table(params.split.path), classes, labels, SPLITS,
                                 f"{params.split.path} vs {params.preprocess.cache_dir}")["phash"].to_numpy()
    folds = grouped_folds(labels, groups, cv.folds, params.seed)
    empty = [fold for fold in range(cv.folds) if not np.any(folds == fold)]
    if empty:
        raise UserError(f"crossval.folds: {cv.folds} folds but only {len(np.unique(groups))} duplicate groups; "
                        f"fold(s) {empty} would be empty: use fewer folds")
    started = time.perf_counter()
    held_out = load_held_out(params, classes, labels, groups, folds)
    cross_seconds = time.perf_counter() - started
    # Checked before TensorFlow and MLflow load, so that a user mistake answers at once.
    import mlflow

    from tumorscope import tracking
    from tumorscope.data.cross_source import UNTIED, prepared
    from tumorscope.inference import predict_proba
    from tumorscope.models.crossval import held_out_report
    from tumorscope.models.train import fit_and_score

    started = time.perf_counter()
    cross_images = None if held_out is None else prepared(held_out.source, params.preprocess)
    cross_seconds += time.perf_counter() - started
    cross_out_of_fold = None if held_out is None else np.full((len(held_out.folds), len(classes)), np.nan)
    out_of_fold = np.zeros((len(labels), len(classes)), dtype=np.float32)
    # Each slice's referral by its fold's model with a trust state fitted on that fold's training
    # and validation slices, as `train` fits one: None = decided, else the reason.
    referrals: dict[str, list] = {"in_source": [None] * len(labels),
                                  "cross_source": [None] * (0 if held_out is None else len(held_out.folds))}
    all_started = time.perf_counter()
    train_distance = np.zeros(len(labels), dtype=np.int64)  # test slice -> nearest training slice of its round
    rounds = []
    experiment_id = tracking.configure(params.mlflow)
    with tracking.start_training_run(params, experiment_id, f"crossval-{cfg.architecture}-{cv.folds}fold",
                                     "crossval") as parent:
        mlflow.log_params(tracking.fit_params(params, cfg) | tracking.flatten({"crossval": cv.model_dump()}))
        for fold in range(cv.folds):
            roles = fold_roles(folds, fold, cv.folds)
            with tracking.start_training_run(params, experiment_id, f"crossval-fold-{fold}", "crossval-fold",
                                             parent.info.run_id, {"fold": str(fold)}):
                outcome = fit_and_score(cfg, params.preprocess.image_size, classes, params.seed,
                                        (images[roles["train"]], labels[roles["train"]]),
                                        (images[roles["val"]], labels[roles["val"]]),
                                        (images[roles["test"]], labels[roles["test"]], groups[roles["test"]]),
                                        params.evaluate, callbacks=[tracking.epoch_logger()])
                tracking.log_fit(params, cfg, outcome, "test_")
            out_of_fold[roles["test"]] = outcome.probabilities
            if held_out is not None and cross_images is not None and cross_out_of_fold is not None \
                    and np.any(mine := held_out.folds == fold):
                started = time.perf_counter()
                cross_out_of_fold[mine] = predict_proba(outcome.result.model, cross_images[mine],
                                                        test_time_augmentation=params.evaluate.test_time_augmentation)
                cross_seconds += time.perf_counter() - started
            to_judge = {"in_source": np.flatnonzero(roles["test"])}
            if held_out is not None:
                to_judge["cross_source"] = np.flatnonzero(held_out.folds == fold)
            for name, reasons in fold_referrals(params, classes, outcome.result.model, roles, (images, labels, groups),
                                                {"in_source": images, "cross_source": cross_images}, to_judge).items():
                for index, reason in zip(to_judge[name], reasons, strict=True):
                    referrals[name][index] = reason
            train_distance[roles["test"]] = nearest_distances(hashes[roles["test"]], hashes[roles["train"]])
            rounds.append({"fold": fold, **{f"n_{role}": int(mask.sum()) for role, mask in roles.items()},
                           "test_counts": {c: int(np.sum(labels[roles["test"]] == i)) for i, c in enumerate(classes)},
                           "epochs_run": outcome.result.epochs_run, **summary_scores(outcome.scores)})
        pooled = summary_scores(score_predictions(labels, out_of_fold, groups, classes, params.evaluate, params.seed))
        report = {"folds": cv.folds, "n_images": int(len(labels)), "n_groups": int(len(np.unique(groups))),
                  "phash_threshold": params.split.phash_threshold, "image_size": params.preprocess.image_size,
                  "architecture": cfg.architecture, "train": cfg.model_dump(), "classes": classes,
                  "critical_class": params.evaluate.critical_class,
                  "macro_f1": summarise_rounds(rounds, "macro_f1"),
                  "critical_recall": summarise_rounds(rounds, "critical_recall"),
                  "degenerate_folds": [r["fold"] for r in rounds if r["degenerate"]],
                  "pooled": pooled, "rounds": rounds, "mlflow_run_id": parent.info.run_id,
                  "accuracy_by_train_distance": accuracy_by_distance(out_of_fold.argmax(axis=1) == labels,
                                                                     train_distance, params.evaluate.distance_bands),
                  "in_source": held_out_report(labels, out_of_fold, groups, images, classes, params.evaluate,
                                               params.seed),
                  "acquisition_baselines": shortcut_comparisons(params, classes, (images, labels, groups, folds),
                                                                out_of_fold, held_out, cross_images, cross_out_of_fold)}
        report["referral"] = {"in_source": referral_report(params, classes, labels, out_of_fold, groups,
                                                          referrals["in_source"])}
        report["seconds"] = {"total": time.perf_counter() - all_started + cross_seconds,
                             "cross_source": cross_seconds}  # reading, preparing and scoring the other export
        if held_out is not None and cross_images is not None and cross_out_of_fold is not None:
            report["cross_source"] = held_out.summary | held_out_report(
                held_out.source.labels, cross_out_of_fold, held_out.series, cross_images, classes, params.evaluate,
                params.seed)
            scored = held_out.folds != UNTIED
            report["referral"]["cross_source"] = referral_report(
                params, classes, held_out.source.labels[scored], cross_out_of_fold[scored], held_out.series[scored],
                [r for r, s in zip(referrals["cross_source"], scored, strict=True) if s])
        write_json(cv.report_path, report)
        mlflow.log_metrics({f"cv_macro_f1_{k}": v for k, v in report["macro_f1"].items() if v is not None}
                           | {f"cv_critical_recall_{k}": v for k, v in report["critical_recall"].items() if v is not None}
                           | flat_scores(pooled, "pooled_")
                           | (flat_scores(report["cross_source"], "cross_source_")
                              if report.get("cross_source", {}).get("n") else {}))
        mlflow.log_artifact(cv.report_path)
    return crossval_summary_line(report, params.evaluate.critical_class)
