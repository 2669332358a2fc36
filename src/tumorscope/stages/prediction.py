"""Predict: batch inference on new slices and, for a labelled folder, external validation (the
evaluation's metrics on a hospital's own scans, logged to the model's MLflow run).

Every file goes through ``tumorscope.inference`` (the cache's decoding and preprocessing) and every
score through ``models.evaluate.score_predictions``.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np

from tumorscope.config import Params
from tumorscope.errors import UserError
from tumorscope.reports import write_json


def load_for_prediction(params: Params, model: str | None):
    """A model directory (``models``), or a registry alias/version/URI (default serve.model)."""
    from tumorscope import registry, tracking
    from tumorscope.inference import load_model_dir

    ref = model or params.serve.model
    if Path(ref).is_dir():
        return load_model_dir(ref)
    tracking.configure(params.mlflow)
    return registry.load_model(params.promote.registered_model, ref)


def check_sources_exist(sources: list[Path]) -> None:
    missing = [str(s) for s in sources if not s.exists()]
    if missing:
        raise UserError(f"predict: not found: {', '.join(missing)}")


def _visible_files(folder: Path) -> list[Path]:
    """Every file under ``folder`` except hidden ones ('.name', and '_name' side folders as in ingest)."""
    return sorted(p for p in folder.rglob("*") if p.is_file()
                  and not any(part.startswith((".", "_")) for part in p.relative_to(folder).parts))


def collect_sources(sources: list[Path], classes: list[str], extensions: list[str]) -> tuple[list[Path], list[str] | None, str]:
    """(files, labels or None, a note). A single folder of class folders named like the model's
    classes is labelled (external validation); any other folder gives every file under it; files
    are taken as given. Nothing is skipped silently: every file is listed, and one that is not an
    image gets its reason in the CSV (extensionless DICOM files, common in exports, are read too)."""
    from tumorscope.data.ingest import find_class_root

    check_sources_exist(sources)
    if len(sources) == 1 and sources[0].is_dir():
        root = find_class_root(sources[0], extensions)
        folders = [d for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith((".", "_"))]
        names = [d.name for d in folders]
        loose = [p for p in root.iterdir() if p.is_file() and not p.name.startswith(".")]
        if folders and all(name in classes for name in names):
            files, labels = [], []
            for folder in folders:
                found = _visible_files(folder)
                files += found
                labels += [folder.name] * len(found)
            note = f"; {len(loose)} file(s) beside the class folders not scored" if loose else ""
            return files, labels, note
        note = (f"; not scored as labelled: folders {names} are not all among the model's classes {classes}"
                if folders else "")
    else:
        note = ""
    files = []
    for source in sources:
        files += _visible_files(source) if source.is_dir() else [source]
    if not files:
        raise UserError(f"predict: no files in {', '.join(map(str, sources))}")
    return files, None, note


def read_for_prediction(paths: list[Path], spec: dict):
    """(prepared images, per-file rows with sha256/pHash or the reason a file could not be read)."""
    from tumorscope.data.images import UnreadableImage, check_file_size, error_reason
    from tumorscope.data.manifest import phash_hex
    from tumorscope.inference import PreparedImage, prepare_bytes
    from tumorscope.progress import progress

    prepared: list[PreparedImage | None] = []
    rows = []
    for path in progress(paths, len(paths), "predict"):
        row = {"path": str(path), "sha256": "", "phash": "", "error": ""}
        try:
            check_file_size(path.stat().st_size)
            data = path.read_bytes()
            row["sha256"] = hashlib.sha256(data).hexdigest()
            image = prepare_bytes(data, path.suffix, spec)
        except (UnreadableImage, OSError) as err:
            row["error"] = error_reason(err)
            prepared.append(None)
        else:
            row["phash"] = phash_hex(image.decoded if image.decoded is not None else image.pixels[:, :, 0])
            prepared.append(dataclasses.replace(image, decoded=None))  # full-size slices add up over a folder
        rows.append(row)
    return prepared, rows


def training_hashes(params: Params, loaded) -> tuple[np.ndarray | None, str]:
    """pHashes of the model's training slices, when this project's split table is the one the
    model trained on (its MLflow run's dataset fingerprint matches); else None and why."""
    import mlflow

    from tumorscope.data.split import read_split_table
    from tumorscope.tracking import file_fingerprint

    split_path = Path(params.split.path)
    run_id = loaded.source.get("run_id")
    if not split_path.is_file() or not run_id:
        return None, f"no split table ({split_path}) or training run to compare with"
    try:
        trained_on = mlflow.MlflowClient().get_run(run_id).data.tags.get("dataset_fingerprint")
    except Exception:  # a model file without a reachable run
        trained_on = None
    if trained_on != file_fingerprint(split_path):
        return None, f"{split_path} is not the split the model trained on (fingerprint differs)"
    table = read_split_table(str(split_path))
    return table.loc[table["split"] == "train", "phash"].to_numpy(), ""


def answer_table(table, labels: list[str] | None, readable: list[int], classes: list[str], probabilities: np.ndarray,
                 judged):
    """The CSV's columns: predicted class, calibrated ``p_<class>`` (the model's own as ``raw_p_``),
    the prediction set, whether to refer and why, whether as unlike the training slices (``ood``) and
    the OOD distance; unreadable rows stay, empty."""
    if labels is not None:
        table.insert(1, "label", labels)
    shown = judged.probabilities if judged is not None else probabilities
    table["predicted"] = ""
    table.loc[readable, "predicted"] = [classes[i] for i in probabilities.argmax(axis=1)]
    for name, values in (("p", shown), ("raw_p", probabilities)):
        for j, c in enumerate(classes):
            table[f"{name}_{c}"] = np.nan
            table.loc[readable, f"{name}_{c}"] = values[:, j]
    table["prediction_set"] = ""
    table["refer"] = ""
    table["refer_reason"] = ""
    table["ood"] = ""
    table["ood_distance"] = np.nan
    table["orientation"] = ""
    if judged is not None:
        table.loc[readable, "prediction_set"] = ["|".join(c for c, inside in zip(classes, row, strict=True) if inside)
                                                 for row in judged.sets]
        table.loc[readable, "refer"] = judged.refer.tolist()
        table.loc[readable, "refer_reason"] = [reason or "" for reason in judged.reasons]
        table.loc[readable, "ood"] = judged.ood.tolist()
        table.loc[readable, "ood_distance"] = judged.ood_distance
        table.loc[readable, "orientation"] = judged.orientations
    return table


def referral_note(judged, has_trust: bool) -> str:
    if not has_trust:
        return "\npredict: this model has no trust state (calibration, prediction sets, referral): retrain it"
    if judged is None:
        return ""
    return (f"\npredict: {int(judged.refer.sum())} of {len(judged.reasons)} referred to a radiologist "
            f"({judged.refer.mean():.0%}; see refer_reason)")


def run_predict(params: Params, sources: list[Path], model: str | None = None, out: Path | None = None) -> str:
    """Class and probabilities per image (CSV), and for a labelled folder an external validation
    report (the evaluation's metrics) logged to the model's MLflow run."""
    check_sources_exist(sources)  # before the heavy imports and the model: a typo answers at once
    import mlflow
    import pandas as pd

    from tumorscope import tracking
    from tumorscope.data.split import duplicate_groups, nearest_distances
    from tumorscope.inference import stack
    from tumorscope.models import evaluate as ev

    loaded = load_for_prediction(params, model)
    classes = loaded.classes
    files, labels, note = collect_sources(sources, classes, params.data.image_extensions)
    prepared, rows = read_for_prediction(files, loaded.spec)
    readable = [i for i, p in enumerate(prepared) if p is not None]
    images = stack([prepared[i] for i in readable], loaded.image_size)
    probabilities, judged = loaded.answers(images)
    table = answer_table(pd.DataFrame(rows), labels, readable, classes, probabilities, judged)
    table["model_version"] = loaded.version
    out_dir = Path(params.serve.predictions_dir)
    csv_path = out or out_dir / "predictions.csv"
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(csv_path, index=False)
    n_bad = len(files) - len(readable)
    line = (f"predict: {len(readable)} of {len(files)} images with {loaded.version} -> {csv_path}"
            + (f" ({n_bad} unreadable: see the error column)" if n_bad else "") + note
            + referral_note(judged, loaded.trust is not None))
    if labels is None or not readable:
        return line

    known = table.loc[readable]
    truth = np.array([classes.index(label) for label in known["label"]])
    groups = duplicate_groups(known["sha256"].to_numpy(), known["phash"].to_numpy(), params.split.phash_threshold)
    scores = ev.score_predictions(truth, probabilities, groups, classes, params.evaluate, params.seed)
    if judged is not None:
        from tumorscope.trust.assessment import trust_scores

        scores["trust"] = trust_scores(truth, probabilities, judged, groups, classes, loaded.trust, params.evaluate,
                                       params.seed)
    train_hashes, why_no_distance = training_hashes(params, loaded)
    bands = (ev.accuracy_by_distance(probabilities.argmax(axis=1) == truth,
                                     nearest_distances(known["phash"].to_numpy(), train_hashes),
                                     params.evaluate.distance_bands) if train_hashes is not None else None)
    report_path = csv_path.with_name(csv_path.stem + "_validation.json")
    write_json(report_path, scores | {"model_version": loaded.version, "source": [str(s) for s in sources],
                                      "n_files": len(files), "n_unreadable": n_bad,
                                      "accuracy_by_train_distance": bands, "distance_note": why_no_distance})
    run_id = loaded.source.get("run_id")
    logged = ""
    if run_id:
        tracking.configure(params.mlflow)
        try:
            with mlflow.start_run(run_id=run_id):
                mlflow.log_metrics(ev.flat_scores(scores, "external_"))
                mlflow.log_artifact(str(report_path), artifact_path="external_validation")
            logged = f", logged to MLflow run {run_id}"
        except mlflow.exceptions.MlflowException as err:  # a model file whose run is in another store
            logged = f" (not logged to MLflow: {str(err).splitlines()[0]})"
    recalls = ", ".join(f"{c} {v:.2f}" for c, v in scores["recall"].items())
    return (f"{line}\npredict: external validation on {scores['n']} labelled images ({scores['n_groups']} groups): "
            f"macro-F1 {scores['macro_f1']:.3f}{ev.format_interval(scores['macro_f1_ci'])}, ECE {scores['ece']:.3f}; "
            f"recall {recalls}{external_trust_note(scores.get('trust'))} -> {report_path}{logged}")


def external_trust_note(trust: dict | None) -> str:
    if trust is None:
        return ""
    selective = trust["referral"]["selective_accuracy"]["value"]
    return (f"; prediction sets cover {trust['conformal']['coverage']['value']:.3f} "
            f"(target {trust['conformal']['target_coverage']:.2f}), referred {trust['referral']['referred']['value']:.3f}"
            f", accuracy on the rest {'-' if selective is None else f'{selective:.3f}'}")
