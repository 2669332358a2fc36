"""Ablate: train every variant of ``ablation.variants`` on the same grouped folds and compare each
with the baseline, paired (``models.ablation``).

Not a DVC stage (folds x variants trainings). Each finished fold is stored under
``ablation.out_dir/<variant>/fold-<i>.npz`` with the fingerprint of what produced it and the
settings it trained with, so a killed run continues at the next unfinished fold, a changed
variant or setting is computed again, and a param added later at its default keeps the folds. Each variant is
a parent run in MLflow with its folds nested (a resumed variant reopens its parent run).

With ``cross_source.path`` every fold's model also scores the other export's slices of that fold's
held-out series (``data.cross_source``), and the verdict follows that cross-export figure; the
in-source figure stays beside it. A stored fold without those scores is trained again.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np

from tumorscope.config import Params
from tumorscope.errors import UserError
from tumorscope.reports import write_json

FOLD_FILE = "fold-{fold}.npz"


def variant_plan(params: Params) -> dict[str, tuple[dict, float]]:
    """name -> (overrides, share of training series): the baseline, the other variants, then the
    learning curve (the baseline at smaller shares). Every override is validated here, before anything trains."""
    from tumorscope.config import merge, with_overrides

    cfg = params.ablation
    # The baseline first: every variant is compared with it, from the first report on.
    ordered = [cfg.baseline, *(name for name in cfg.variants if name != cfg.baseline)]
    plan = {name: (merge(cfg.common, cfg.variants[name]), cfg.train_share) for name in ordered}
    for share in cfg.learning_curve:
        plan[f"{cfg.baseline} at {share:.0%} of series"] = (plan[cfg.baseline][0], share * cfg.train_share)
    for name, (overrides, _) in plan.items():
        try:
            with_overrides(params, overrides)
        except UserError as err:
            raise UserError(f"ablation variant {name!r}: {err}") from None
    return plan


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "variant"


def cache_megabytes(cache: Path) -> float:
    """Size of a cache's image arrays (what a resolution costs on disk)."""
    return sum(path.stat().st_size for path in cache.glob("*_x.npy")) / 2**20


def pixel_settings(variant: Params) -> dict:
    """The preprocess settings that decide a variant's pixels (``inference.PIXEL_SETTINGS``)."""
    from tumorscope.inference import PIXEL_SETTINGS

    return {k: getattr(variant.preprocess, k) for k in PIXEL_SETTINGS}


def variant_cache(params: Params, variant: Params) -> Path:
    """Where a variant's cached slices are: the project's cache, or ablation.out_dir/cache-<hash of
    its pixel settings> when its preprocess settings differ."""
    from tumorscope.models.ablation import variant_fingerprint

    settings = pixel_settings(variant)
    if settings == pixel_settings(params):
        return Path(params.preprocess.cache_dir)
    return Path(params.ablation.out_dir) / f"cache-{variant_fingerprint(settings, 1.0, {})}"


def variant_images(params: Params, variant: Params, base_images: np.ndarray, labels: np.ndarray,
                   groups: np.ndarray) -> np.ndarray:
    """The cached slices a variant trains on: the project's cache, or one built from the split table
    with the variant's preprocess settings (``variant_cache``, built once and reused)."""
    from tumorscope.data.preprocess import build_cache, load_cached_dataset, load_classes
    from tumorscope.data.split import read_split_table

    cache = variant_cache(params, variant)
    if cache == Path(params.preprocess.cache_dir):
        return base_images
    if not (cache / "classes.json").is_file():
        cfg = variant.preprocess.model_copy(update={"cache_dir": str(cache)})
        build_cache(read_split_table(params.split.path), load_classes(params.preprocess.cache_dir), cfg,
                    params.data.dicom_window)
    images, variant_labels, variant_groups = load_cached_dataset(cache)
    if not (np.array_equal(variant_labels, labels) and np.array_equal(variant_groups, groups)):
        raise UserError(f"{cache} holds other slices than {params.preprocess.cache_dir}: remove it and run again")
    return images


# The params a fold's result depends on (locations excluded: a resumed run may keep them elsewhere).
SETTING_SECTIONS = {"seed", "preprocess", "train", "evaluate"}


def settings_of(params: Params) -> dict[str, object]:
    """The flat settings a variant trains and scores with ('train.lr': 0.001, ...)."""
    from tumorscope.tracking import flatten

    flat = flatten(params.model_dump(include=SETTING_SECTIONS, mode="json"))
    return {key: value for key, value in flat.items() if not key.endswith(("_dir", "_path"))}


def _stored_fold(path: Path, fingerprint: str, settings: dict, defaults: dict, cross: str | None) -> dict | None:
    """A finished fold of this variant (same fingerprint, same settings by ``same_settings``, and
    with ``cross`` the other source's scores of that fingerprint), or None."""
    import json

    from tumorscope.models.ablation import same_settings

    if not path.is_file():
        return None
    with np.load(path) as stored:
        if (str(stored["fingerprint"]) != fingerprint or "settings" not in stored.files
                or not same_settings(json.loads(str(stored["settings"])), settings, defaults)):
            return None
        if cross is not None and ("cross_fingerprint" not in stored.files or str(stored["cross_fingerprint"]) != cross):
            return None
        extra = {"cross_probabilities": stored["cross_probabilities"]} if cross is not None else {}
        return extra | {"probabilities": stored["probabilities"], "seconds": float(stored["seconds"]),
                "epochs": int(stored["epochs"]), "n_train": int(stored["n_train"]),
                "n_train_series": int(stored["n_train_series"])}


def _store_fold(path: Path, fingerprint: str, settings: dict, fold: dict) -> None:
    """Written to a temporary file and renamed: a kill mid-write leaves no half fold behind."""
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.stem + ".partial.npz")
    arrays: dict[str, np.ndarray] = {k: np.asarray(v) for k, v in fold.items()} | {
        "fingerprint": np.array(fingerprint), "settings": np.array(json.dumps(settings, sort_keys=True))}
    np.savez(partial, allow_pickle=False, **arrays)
    partial.replace(path)


def _parent_run(params: Params, experiment_id: str, name: str, fingerprint: str):
    """The variant's MLflow parent run: the one an interrupted run of the same variant started, or a new one."""
    import mlflow

    from tumorscope import tracking

    found = mlflow.search_runs([experiment_id], filter_string=f"tags.ablation_fingerprint = '{fingerprint}'",
                               max_results=1, output_format="list")
    if found:
        return mlflow.start_run(run_id=found[0].info.run_id)
    return tracking.start_training_run(params, experiment_id, f"ablation-{name}", "ablation",
                                       tags={"variant": name, "ablation_fingerprint": fingerprint})


def run_variant(params: Params, name: str, overrides: dict, share: float, data: dict, experiment_id: str) -> dict:
    """Every fold of one variant (stored folds are read back, not retrained): its out-of-fold
    probabilities and timings."""
    import mlflow

    from tumorscope import tracking
    from tumorscope.config import with_overrides
    from tumorscope.models.ablation import training_subsample, variant_fingerprint
    from tumorscope.models.crossval import fold_roles
    from tumorscope.models.train import fit_and_score
    from tumorscope.progress import progress

    cfg = params.ablation
    variant = with_overrides(params, overrides)
    labels, groups, folds, classes = data["labels"], data["groups"], data["folds"], data["classes"]
    fingerprint = variant_fingerprint(overrides, share, data["base"])
    settings, defaults = settings_of(variant), settings_of(params)
    images = None  # built or loaded when a fold has to train: a finished variant reads its folds only
    out_of_fold = np.full((len(labels), len(classes)), np.nan, dtype=np.float32)
    held_out = data.get("held_out")
    cross = None if held_out is None else held_out.summary["fingerprint"]
    cross_out_of_fold = None if held_out is None else np.full((len(held_out.folds), len(classes)), np.nan)
    folds_done = []
    # One parent run per variant and settings: a resumed run with other settings starts a new one.
    with _parent_run(variant, experiment_id, name, variant_fingerprint(settings, share, data["base"])) as parent:
        for fold in progress(range(cfg.folds), cfg.folds, f"ablation {name}"):
            path = Path(cfg.out_dir) / _slug(name) / FOLD_FILE.format(fold=fold)
            roles = fold_roles(folds, fold, cfg.folds)
            done = _stored_fold(path, fingerprint, settings, defaults, cross)
            if done is None and variant.train.fit == "linear_probe":
                done = probe_fold(params, variant, fold, roles, share, data, experiment_id, parent.info.run_id, name)
                _store_fold(path, fingerprint, settings, done)
            if done is None:
                if images is None:
                    images = variant_images(params, variant, data["images"], labels, groups)
                train = training_subsample(roles["train"], groups, share, params.seed, fold)
                train_data = (images[train], labels[train])
                if variant.cross_source.train_on:
                    train_data = with_other_export(train_data, variant, held_out, fold, data)
                started = time.perf_counter()
                with tracking.start_training_run(variant, experiment_id, f"ablation-{name}-fold-{fold}", "ablation-fold",
                                                 parent.info.run_id, {"fold": str(fold), "variant": name}):
                    outcome = fit_and_score(variant.train, variant.preprocess.image_size, classes, variant.seed,
                                            train_data,
                                            (images[roles["val"]], labels[roles["val"]]),
                                            (images[roles["test"]], labels[roles["test"]], groups[roles["test"]]),
                                            variant.evaluate, callbacks=[tracking.epoch_logger()])
                    tracking.log_fit(variant, variant.train, outcome, "test_")
                done = {"probabilities": outcome.probabilities, "seconds": time.perf_counter() - started,
                        "epochs": outcome.result.epochs_run, "n_train": int(len(train_data[1])),
                        "n_train_series": int(len(np.unique(groups[train])))}
                if held_out is not None:
                    done |= {"cross_probabilities": cross_fold_probabilities(variant, held_out, fold, outcome.result.model,
                                                                             data),
                             "cross_fingerprint": cross}
                _store_fold(path, fingerprint, settings, done)
            out_of_fold[roles["test"]] = done["probabilities"]
            if held_out is not None and cross_out_of_fold is not None:
                mine = held_out.folds == fold
                cross_out_of_fold[mine] = done["cross_probabilities"][mine]
            folds_done.append({"fold": fold, "seconds": done["seconds"], "epochs": done["epochs"],
                               "n_train": done["n_train"], "n_train_series": done["n_train_series"]})
        mlflow.log_params(tracking.flatten({"ablation": {"overrides": overrides, "train_share": share}}))
    return {"overrides": overrides, "train_share": share, "fingerprint": fingerprint, "run_id": parent.info.run_id,
            "image_size": variant.preprocess.image_size,
            # None when every fold was read back and the cache was not needed (nor built) in this run.
            "cache_mb": round(cache_megabytes(cache), 3) if (cache := variant_cache(params, variant)).is_dir() else None,
            "feature_cache_mb": _feature_megabytes(params, variant, data),
            "probabilities": out_of_fold, "cross_probabilities": cross_out_of_fold, "folds": folds_done,
            "seconds": sum(f["seconds"] for f in folds_done)}


def variant_features(params: Params, variant: Params, data: dict) -> dict[str, np.ndarray]:
    """A linear-probe variant's pooled backbone features of every cached slice ("main") and of the
    other export's slices ("cross"): computed once per backbone, weights and pixel settings, and kept
    as ``ablation.out_dir/features-<hash>.npz`` so that its folds, a rerun and a variant that changes
    only the probe cost seconds."""
    from tumorscope.models.devices import fresh_session
    from tumorscope.models.probe import features_of
    from tumorscope.models.zoo import build_configured

    held_out = data.get("held_out")
    path = feature_path(params, variant, data)
    memory = data.setdefault("features", {})
    if path in memory:
        return memory[path]
    if not path.is_file():
        started = time.perf_counter()
        fresh_session()
        model = build_configured(variant.train, variant.preprocess.image_size, len(data["classes"]), variant.seed)
        images = variant_images(params, variant, data["images"], data["labels"], data["groups"])
        arrays: dict[str, np.ndarray] = {"main": features_of(model, images)}
        if held_out is not None:
            arrays["cross"] = features_of(model, _cross_images(variant, held_out, data))
        arrays["seconds"] = np.array(time.perf_counter() - started)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.stem + ".partial.npz")
        np.savez(partial, allow_pickle=False, **arrays)
        partial.replace(path)
    with np.load(path) as stored:
        memory[path] = {name: stored[name] for name in stored.files} | {"megabytes": path.stat().st_size / 2**20}
    return memory[path]


def feature_path(params: Params, variant: Params, data: dict) -> Path:
    """Where a linear-probe variant's features are kept: a hash of its backbone, weights, pixel
    settings and other export, and of what every variant shares (data, folds, seed)."""
    from tumorscope.models.ablation import variant_fingerprint

    held_out = data.get("held_out")
    key = {"pixels": pixel_settings(variant), "architecture": variant.train.architecture,
           "weights": variant.train.weights, "cross": None if held_out is None else held_out.summary["fingerprint"]}
    return Path(params.ablation.out_dir) / f"features-{variant_fingerprint(key, 1.0, data['base'])}.npz"


def _feature_megabytes(params: Params, variant: Params, data: dict) -> float | None:
    """The size of a linear-probe variant's feature cache (None for other variants, or before it exists)."""
    if variant.train.fit != "linear_probe":
        return None
    path = feature_path(params, variant, data)
    return round(path.stat().st_size / 2**20, 3) if path.is_file() else None


def probe_fold(params: Params, variant: Params, fold: int, roles: dict, share: float, data: dict, experiment_id: str,
               parent_run_id: str, name: str) -> dict:
    """One fold of a ``train.fit: linear_probe`` variant on cached features: the probe chosen on the
    validation fold (``models.probe.choose_probe``), its probabilities on the test fold and, with a
    cross source, on that fold's slices of the other export. The same probe ``train`` fits, without
    running the backbone again."""
    import mlflow

    from tumorscope import tracking
    from tumorscope.models.ablation import training_subsample
    from tumorscope.models.probe import choose_probe, probe_probabilities

    labels, groups = data["labels"], data["groups"]
    features = variant_features(params, variant, data)
    train = training_subsample(roles["train"], groups, share, params.seed, fold)
    started = time.perf_counter()
    chosen = choose_probe((features["main"][train], labels[train]),
                          (features["main"][roles["val"]], labels[roles["val"]]),
                          len(data["classes"]), variant.train, variant.seed)
    done: dict = {"probabilities": probe_probabilities(features["main"][roles["test"]], chosen["kernel"], chosen["bias"]),
            # the backbone's pass over every slice is shared by the folds: each carries its share
            "seconds": time.perf_counter() - started + float(features["seconds"]) / params.ablation.folds,
            "epochs": 1, "n_train": int(train.sum()), "n_train_series": int(len(np.unique(groups[train])))}
    held_out = data.get("held_out")
    if held_out is not None:
        cross = np.full((len(held_out.folds), len(data["classes"])), np.nan, dtype=np.float32)
        mine = held_out.folds == fold
        cross[mine] = probe_probabilities(features["cross"][mine], chosen["kernel"], chosen["bias"])
        done |= {"cross_probabilities": cross, "cross_fingerprint": held_out.summary["fingerprint"]}
    with tracking.start_training_run(variant, experiment_id, f"ablation-{name}-fold-{fold}", "ablation-fold",
                                     parent_run_id, {"fold": str(fold), "variant": name}):
        mlflow.log_metrics({"probe_c": chosen["c"], "val_loss": chosen["val_loss"],
                            "feature_cache_mb": float(features["megabytes"])})
    return done


def _cross_images(variant: Params, held_out, data: dict) -> np.ndarray:
    """The other source's slices prepared with the variant's preprocess settings (once per setting)."""
    from tumorscope.data.cross_source import prepared

    key = tuple(pixel_settings(variant).values())
    cache = data.setdefault("cross_images", {})
    if key not in cache:
        cache[key] = prepared(held_out.source, variant.preprocess)
    return cache[key]


def with_other_export(train_data: tuple[np.ndarray, np.ndarray], variant: Params, held_out, fold: int,
                      data: dict) -> tuple[np.ndarray, np.ndarray]:
    """``cross_source.train_on``: the fold's training slices plus the other export's slices tied to
    its training series; those tied to its validation or test series, or to no fold, stay out."""
    if held_out is None:
        raise UserError("cross_source.train_on needs cross_source.path: the other export to train on")
    from tumorscope.data.cross_source import UNTIED

    n_folds = variant.ablation.folds
    mine = (held_out.folds != UNTIED) & (held_out.folds != fold) & (held_out.folds != (fold + 1) % n_folds)
    images = _cross_images(variant, held_out, data)[mine]
    return np.concatenate([train_data[0], images]), np.concatenate([train_data[1], held_out.source.labels[mine]])


def ensembles_of(params: Params, results: dict[str, dict]) -> dict[str, dict]:
    """``ablation.ensembles`` whose members are all in ``results``: the ensemble's probabilities (in
    source and across exports) by the rule the train stage serves (``models.ensemble``: the mean of
    the members' logits) and their summed training time."""
    from tumorscope.models.ensemble import mean_logit_probabilities

    out = {}
    for name, members in params.ablation.ensembles.items():
        if not all(m in results for m in members):
            continue
        parts = [results[m] for m in members]
        cross = [p["cross_probabilities"] for p in parts]
        out[name] = {"overrides": {"mean logits of": members}, "train_share": parts[0]["train_share"],
                     "image_size": max(p["image_size"] for p in parts), "cache_mb": None,
                     "probabilities": mean_logit_probabilities([p["probabilities"] for p in parts]),
                     "cross_probabilities": None if any(c is None for c in cross) else mean_logit_probabilities(cross),
                     "folds": [], "seconds": sum(p["seconds"] for p in parts)}
    return out


def cross_fold_probabilities(variant: Params, held_out, fold: int, model, data: dict) -> np.ndarray:
    """The other source's probabilities from one fold's model: its slices of that fold's held-out
    series, prepared with the variant's preprocess settings (once per setting); NaN elsewhere."""
    from tumorscope.inference import predict_proba

    images = _cross_images(variant, held_out, data)
    out = np.full((len(held_out.folds), len(data["classes"])), np.nan, dtype=np.float32)
    mine = held_out.folds == fold
    if mine.any():
        out[mine] = predict_proba(model, images[mine],
                                  test_time_augmentation=variant.evaluate.test_time_augmentation)
    return out


def summarise(params: Params, results: dict[str, dict], data: dict) -> dict:
    """Per variant: pooled out-of-fold macro-F1, critical recall (group-bootstrap intervals) and
    ECE, and the paired differences to the baseline."""
    from tumorscope.models.ablation import paired_differences, verdict
    from tumorscope.models.evaluate import class_index, score_predictions

    cfg, evaluate = params.ablation, params.evaluate
    labels, groups, classes = data["labels"], data["groups"], data["classes"]
    held_out = data.get("held_out")
    critical = class_index(classes, evaluate.critical_class)
    baseline = results[cfg.baseline]["probabilities"].argmax(axis=1)
    variants = {}
    for name, result in results.items():
        scores = score_predictions(labels, result["probabilities"], groups, classes, evaluate, params.seed)
        critical_ci = scores["recall_ci"].get(evaluate.critical_class) if critical is not None else None
        summary = {"macro_f1": {"value": scores["macro_f1"], **scores["macro_f1_ci"]},
                   "critical_recall": None if critical_ci is None else
                   {"value": scores["recall"][evaluate.critical_class], "low": critical_ci["low"],
                    "high": critical_ci["high"]},
                   "ece": scores["ece"], "recall": scores["recall"], "degenerate": scores["degenerate"]}
        entry = {k: v for k, v in result.items() if k not in ("probabilities", "cross_probabilities")} | {
            "scores": summary}
        if name != cfg.baseline:
            difference = paired_differences(labels, result["probabilities"].argmax(axis=1), baseline, groups,
                                            len(classes), critical, evaluate.bootstrap_samples, evaluate.confidence,
                                            params.seed)
            entry |= {"difference": difference, "verdict": verdict(difference["macro_f1"]),
                      "in_source_verdict": verdict(difference["macro_f1"])}
        if held_out is not None and result.get("cross_probabilities") is not None:
            entry |= cross_entry(params, result["cross_probabilities"], results[cfg.baseline]["cross_probabilities"],
                                 held_out, classes, name == cfg.baseline, data.get("cross_orientations"))
        variants[name] = entry
    return {"baseline": cfg.baseline, "folds": cfg.folds, "n_images": int(len(labels)),
            "n_groups": int(len(np.unique(groups))), "phash_threshold": params.split.phash_threshold,
            "classes": classes, "critical_class": evaluate.critical_class, "train_share": cfg.train_share,
            "common": cfg.common, "data_fingerprint": data["base"]["data"],
            "cross_source": None if held_out is None else held_out.summary, "variants": variants}


def cross_entry(params: Params, probabilities: np.ndarray, baseline: np.ndarray, held_out, classes: list[str],
                is_baseline: bool, orientations: np.ndarray | None = None) -> dict:
    """A variant's cross-export scores (by orientation too, with ``orientations`` of the other
    export's slices) with its risk-coverage curve, and, against the baseline on the same slices, the
    paired differences; the verdict follows them (the in-source one is kept as ``in_source_verdict``)."""
    from tumorscope.models.ablation import paired_differences, verdict
    from tumorscope.models.evaluate import class_index, score_predictions
    from tumorscope.models.shortcuts import scores_by_orientation
    from tumorscope.trust.assessment import coverage_at_accuracy

    evaluate = params.evaluate
    scored = ~np.isnan(probabilities).any(axis=1)
    labels, series = held_out.source.labels[scored], held_out.series[scored]
    scores = score_predictions(labels, probabilities[scored], series, classes, evaluate, params.seed)
    by_orientation = (scores_by_orientation(labels, probabilities[scored], series, orientations[scored], classes,
                                            evaluate, params.seed) if orientations is not None else {})
    critical = class_index(classes, evaluate.critical_class)
    critical_ci = scores["recall_ci"].get(evaluate.critical_class) if critical is not None else None
    entry: dict = {"cross_scores": {
        "n": scores["n"], "n_groups": scores["n_groups"], "macro_f1": {"value": scores["macro_f1"], **scores["macro_f1_ci"]},
        "critical_recall": None if critical_ci is None else {"value": scores["recall"][evaluate.critical_class],
                                                             "low": critical_ci["low"], "high": critical_ci["high"]},
        "ece": scores["ece"], "recall": scores["recall"], "by_orientation": by_orientation,
        "risk_coverage": coverage_at_accuracy(labels, probabilities[scored])}}
    if not is_baseline:
        difference = paired_differences(labels, probabilities[scored].argmax(axis=1), baseline[scored].argmax(axis=1),
                                        series, len(classes), critical, evaluate.bootstrap_samples,
                                        evaluate.confidence, params.seed)
        entry |= {"cross_difference": difference, "verdict": verdict(difference["macro_f1"])}
    return entry


def plot_differences(report: dict, path: Path) -> None:
    """Each variant's paired macro-F1 difference to the baseline with its interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(name, v["difference"]["macro_f1"]) for name, v in report["variants"].items() if v.get("difference")]
    rows = [(name, d) for name, d in rows if d["value"] is not None]
    figure, axes = plt.subplots(figsize=(7, 0.5 * len(rows) + 1.5))
    for y, (_, d) in enumerate(rows):
        axes.errorbar(d["value"], y, xerr=[[d["value"] - d["low"]], [d["high"] - d["value"]]], fmt="o", capsize=4)
    axes.axvline(0.0, color="grey", linewidth=1)
    axes.set_yticks(range(len(rows)), [name for name, _ in rows])
    axes.set_xlabel(f"macro-F1 - {report['baseline']} (paired, 95 % group bootstrap)")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def run_ablate(params: Params, only: list[str] | None = None) -> str:
    """Run (or resume) every variant, then write ablation.report_path, a Markdown table and a plot
    beside it, and return the table. ``only`` runs some variants (the baseline always runs)."""
    from tumorscope.data.preprocess import load_cached_dataset
    from tumorscope.data.split import grouped_folds
    from tumorscope.tracking import file_fingerprint

    cfg = params.ablation
    plan = variant_plan(params)
    if only:
        unknown = sorted(set(only) - set(plan))
        if unknown:
            raise UserError(f"ablate: no variant {', '.join(map(repr, unknown))}; the variants: {', '.join(plan)}")
        plan = {name: spec for name, spec in plan.items() if name in set(only) | {cfg.baseline}}
    from tumorscope.stages.crossval import load_held_out, require_cache

    classes = require_cache(params)
    images, labels, groups = load_cached_dataset(params.preprocess.cache_dir)
    folds = grouped_folds(labels, groups, cfg.folds, params.seed)
    empty = [fold for fold in range(cfg.folds) if not np.any(folds == fold)]
    if empty:
        raise UserError(f"ablation.folds: {cfg.folds} folds but only {len(np.unique(groups))} duplicate groups: use fewer")
    # The params are not in it: each stored fold keeps its settings, compared by ``same_settings``.
    base = {"data": file_fingerprint(params.split.path), "folds": cfg.folds, "seed": params.seed}
    data = {"images": images, "labels": labels, "groups": groups, "folds": folds, "classes": classes, "base": base}
    data["held_out"] = load_held_out(params, classes, labels, groups, folds)
    if data["held_out"] is not None:
        from tumorscope.data.audit import estimate_orientations

        # Estimated on the slices as the project prepares them (the audit's view of the cache).
        data["cross_orientations"] = estimate_orientations(_cross_images(params, data["held_out"], data))

    from tumorscope import tracking

    experiment_id = tracking.configure(params.mlflow)
    results: dict[str, dict] = {}
    out = Path(cfg.report_path)
    for name, (overrides, share) in plan.items():
        results[name] = run_variant(params, name, overrides, share, data, experiment_id)
        results |= ensembles_of(params, results)
        # The report after every variant: a run of hours shows its results as they come.
        table = write_report(params, results, data, out)
        print(f"ablate: {name} done ({results[name]['seconds'] / 60:.1f} min of training); "
              f"{sum(n in plan for n in results)} of {len(plan)} variants in {out}", flush=True)
    return f"{table}\nablate: {len(results)} variants on {cfg.folds} grouped folds -> {out}, {out.with_suffix('.md')}, " \
           f"{out.with_suffix('.png')}"


def write_report(params: Params, results: dict[str, dict], data: dict, out: Path) -> str:
    """ablation.json, its Markdown table and plot for the variants done so far; returns the table."""
    from tumorscope.models.ablation import markdown_table

    report = summarise(params, results, data)
    write_json(out, report)
    table = markdown_table(report)
    out.with_suffix(".md").write_text(table)
    plot_differences(report, out.with_suffix(".png"))
    return table
