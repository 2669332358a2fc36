"""What a data set can and cannot teach: orientation, source and acquisition cues, per class.

A model learns whatever separates the classes. In the public kidney CT data the classes were not
acquired alike: most of one export's slices are coronal, the classes differ in brightness, and an
export's processing (CLAHE, resizing) is a texture of its own. This module measures those cues so
that a report can say what the data cannot support before anything is trained:

- **orientation** of each slice from its body outline (``estimate_orientations``): axial slices
  show the trunk's cross-section, an ellipse wider than tall with air above it; coronal
  reconstructions show the trunk from the front, taller than wide, filling the field from top to
  bottom. Checked by eye on 128 slices of two exports (docs/data.md);
- **series and slices** per class by orientation and by source (``composition``), with a warning
  for every class that has fewer than ``min_series`` series in an orientation or a source that the
  data set uses (``thin_cells``);
- **acquisition-only baselines** (``acquisition_features``, ``thumbnails``, ``fit_baseline``): a
  logistic regression that sees only intensity and texture statistics, or a tiny thumbnail. What
  they score on grouped folds is what a network can score without learning a finding.

Pure numpy/scipy/scikit-learn on (N, H, W[, 1]) uint8 model inputs, the cache's and the service's.
"""

from __future__ import annotations

import numpy as np

from tumorscope.monitoring.features import pixel_features
from tumorscope.trust.ood import INTENSITY_FEATURES

ORIENTATIONS = ("axial", "coronal", "other")
# Body height / width of the largest bright region. Measured on two exports of the public data
# (docs/data.md): axial slices 0.55-0.90, coronal 1.1-2.1, almost none between.
CORONAL_MIN_ASPECT = 1.1
AXIAL_MAX_ASPECT = 0.9
# A pixel is body when it is this many grey levels above the background (the median of the
# slice's left and right edge columns, air in both planes): exports differ in their air level
# (CLAHE lifts it), and a dim, fatty abdomen is only ~10 levels above it.
BODY_ABOVE_BACKGROUND = 8
EDGE_COLUMNS = 3
# Opening radius per pixel of side: cuts the CT table and cables off the body (3 at 96 px).
OPENING_PER_PIXEL = 1 / 32
# The statistics of the acquisition baseline: the referral check's (log 1 + value) and the
# background level.
ACQUISITION_FEATURES = (*INTENSITY_FEATURES, "background")


def _plane(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    return image[..., 0] if image.ndim == 3 else image


def background_levels(images: np.ndarray) -> np.ndarray:
    """(N,) grey level of each slice's air: the median of its outermost left and right columns."""
    images = np.asarray(images)
    planes = images[..., 0] if images.ndim == 4 else images
    edges = np.concatenate([planes[:, :, :EDGE_COLUMNS], planes[:, :, -EDGE_COLUMNS:]], axis=2)
    return np.median(edges.reshape(len(planes), -1), axis=1).astype(np.float64)


def body_mask(image: np.ndarray) -> np.ndarray:
    """(H, W) bool: the largest region brighter than the slice's air, holes filled, table cut off.
    All False when the slice has no such region (blank)."""
    from scipy import ndimage

    plane = _plane(image)
    level = float(background_levels(plane[np.newaxis])[0])
    iterations = max(1, round(min(plane.shape) * OPENING_PER_PIXEL))
    bright = ndimage.binary_fill_holes(ndimage.binary_opening(plane > level + BODY_ABOVE_BACKGROUND,
                                                              iterations=iterations))
    labelled, n = ndimage.label(bright)
    if n == 0:
        return np.zeros(plane.shape, dtype=bool)
    sizes = np.bincount(labelled.ravel())[1:]
    return labelled == int(np.argmax(sizes)) + 1


def body_aspect(image: np.ndarray) -> float:
    """Height / width of the body's bounding box; NaN for a slice without a body."""
    rows, cols = np.nonzero(body_mask(image))
    if not len(rows):
        return float("nan")
    return float((rows.max() - rows.min() + 1) / (cols.max() - cols.min() + 1))


def orientation_of(aspect: float) -> str:
    if aspect >= CORONAL_MIN_ASPECT:
        return "coronal"
    if aspect <= AXIAL_MAX_ASPECT:
        return "axial"
    return "other"  # square-ish or no body: the outline cannot tell


def estimate_orientations(images: np.ndarray) -> np.ndarray:
    """(N,) orientation name of each slice (``ORIENTATIONS``), from its body outline."""
    return np.array([orientation_of(body_aspect(image)) for image in np.asarray(images)], dtype=object)


def mask_body(images: np.ndarray) -> np.ndarray:
    """The slices with the body set to the air's level: only background, table and border left. A
    model that still beats chance on these reads the acquisition, not the anatomy."""
    images = np.array(images, copy=True)
    levels = background_levels(images)
    for image, level in zip(images, levels, strict=True):
        _plane(image)[body_mask(image)] = np.uint8(round(level))
    return images


def acquisition_features(images: np.ndarray) -> np.ndarray:
    """(N, F) acquisition statistics, ``ACQUISITION_FEATURES`` order, as log(1 + value)."""
    stats = pixel_features(images) | {"background": background_levels(images)}
    return np.log1p(np.stack([np.maximum(np.asarray(stats[name], dtype=np.float64), 0.0)
                              for name in ACQUISITION_FEATURES], axis=1))


def thumbnails(images: np.ndarray, size: int) -> np.ndarray:
    """(N, size * size) grey levels / 255 of each slice shrunk to ``size`` px (area averaging)."""
    images = np.asarray(images)
    planes = images[..., 0] if images.ndim == 4 else images
    n, height, width = planes.shape
    rows = np.linspace(0, height, size + 1).astype(int)
    cols = np.linspace(0, width, size + 1).astype(int)
    out = np.empty((n, size, size), dtype=np.float32)
    for i in range(size):
        band = planes[:, rows[i]:rows[i + 1]].astype(np.float32)
        for j in range(size):
            out[:, i, j] = band[:, :, cols[j]:cols[j + 1]].mean(axis=(1, 2))
    return out.reshape(n, -1) / 255.0


def fit_baseline(features: np.ndarray, labels: np.ndarray, n_classes: int, seed: int):
    """A standardised, class-balanced multinomial logistic regression on ``features``: the
    acquisition-only model. Returns a fitted scikit-learn pipeline."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000, class_weight="balanced",
                                                               random_state=seed))
    return model.fit(features, labels)


def baseline_probabilities(model, features: np.ndarray, n_classes: int) -> np.ndarray:
    """(N, n_classes) probabilities of a fitted baseline, with a zero column for a class that was
    absent from its training slices."""
    out = np.zeros((len(features), n_classes))
    out[:, model.classes_] = model.predict_proba(features)
    return out


def out_of_fold_baseline(features: np.ndarray, labels: np.ndarray, folds: np.ndarray, n_classes: int,
                         seed: int) -> np.ndarray:
    """(N, n_classes) probabilities of each slice from a baseline fitted on the other folds."""
    out = np.zeros((len(labels), n_classes))
    for fold in np.unique(folds):
        test = folds == fold
        if len(np.unique(labels[~test])) < 2:
            continue  # nothing to learn: the slice keeps a zero row (scored as class 0)
        out[test] = baseline_probabilities(fit_baseline(features[~test], labels[~test], n_classes, seed),
                                           features[test], n_classes)
    return out


def _cell(groups: np.ndarray, where: np.ndarray) -> dict:
    return {"slices": int(where.sum()), "series": int(len(np.unique(groups[where])))}


def composition(labels: np.ndarray, groups: np.ndarray, orientations: np.ndarray, sources: np.ndarray,
                classes: list[str]) -> dict:
    """Per class: slices and series (duplicate groups) in all, by orientation and by source."""
    labels, groups = np.asarray(labels), np.asarray(groups)
    orientations, sources = np.asarray(orientations, dtype=object), np.asarray(sources, dtype=object)
    source_names = sorted(set(sources.tolist()))
    table = {}
    for index, name in enumerate(classes):
        member = labels == index
        table[name] = _cell(groups, member) | {
            "by_orientation": {o: _cell(groups, member & (orientations == o)) for o in ORIENTATIONS},
            "by_source": {s: _cell(groups, member & (sources == s)) for s in source_names}}
    return table


def thin_cells(table: dict, min_series: int) -> list[str]:
    """One warning per class with fewer than ``min_series`` series in an orientation or a source
    that the data set holds (an orientation no class has is not the data set's, and not warned;
    nor is "other", the slices whose outline cannot tell)."""
    warnings = []
    for dimension, what in (("by_orientation", "orientation"), ("by_source", "source")):
        used = {key for row in table.values() for key, cell in row[dimension].items()
                if cell["slices"] and key != "other"}
        for name, row in table.items():
            for key in sorted(used):
                series = row[dimension][key]["series"]
                if series < min_series:
                    warnings.append(f"{name}: {series} {key} series (< audit.min_series {min_series}): "
                                    f"a model cannot learn {name} on {key} slices for unseen patients "
                                    f"({what} {key!r})")
    return warnings


def orientation_series(labels: np.ndarray, groups: np.ndarray, orientations: np.ndarray) -> dict[str, int]:
    """Series (duplicate groups) per orientation over all classes: what the referral checks a new
    slice's orientation against."""
    orientations = np.asarray(orientations, dtype=object)
    return {o: int(len(np.unique(np.asarray(groups)[orientations == o]))) for o in ORIENTATIONS}


def baseline_scores(labels: np.ndarray, probabilities: np.ndarray, groups: np.ndarray, classes: list[str],
                    critical_class: str, n_samples: int, confidence: float, seed: int) -> dict:
    """Macro-F1 and the critical class's recall of a baseline's predictions, with group-bootstrap
    intervals (whole series resampled)."""
    from tumorscope.models.evaluate import confusion, group_bootstrap, macro_f1_from_confusion, per_class_scores

    predicted = np.asarray(probabilities).argmax(axis=1)
    matrix = confusion(labels, predicted, len(classes))
    recall = per_class_scores(matrix)["recall"]
    interval = group_bootstrap(labels, predicted, groups, len(classes), n_samples, confidence, seed)
    critical = classes.index(critical_class) if critical_class in classes else None
    return {"macro_f1": float(macro_f1_from_confusion(matrix[None])[0]), "macro_f1_ci": interval["macro_f1"],
            "critical_recall": float(recall[critical]) if critical is not None else None,
            "recall": {name: float(recall[i]) for i, name in enumerate(classes)}}


def audit_dataset(images: np.ndarray, labels: np.ndarray, groups: np.ndarray, sources: np.ndarray,
                  classes: list[str], cfg, evaluate, seed: int) -> dict:
    """The audit of a labelled set of model inputs: composition by orientation and source, the
    warnings, and the acquisition-only baselines on grouped folds (``cfg`` is params' ``audit``,
    ``evaluate`` its ``evaluate`` section: bootstrap size, confidence, critical class)."""
    from tumorscope.data.split import grouped_folds

    labels, groups = np.asarray(labels), np.asarray(groups)
    orientations = estimate_orientations(images)
    table = composition(labels, groups, orientations, sources, classes)
    n_folds = min(cfg.folds, len(np.unique(groups)))
    baselines = {}
    if n_folds >= 2 and len(np.unique(labels)) >= 2:
        folds = grouped_folds(labels, groups, n_folds, seed)
        for name, features in (("intensity", acquisition_features(images)),
                               ("thumbnail", thumbnails(images, cfg.thumbnail_size))):
            probabilities = out_of_fold_baseline(features, labels, folds, len(classes), seed)
            baselines[name] = baseline_scores(labels, probabilities, groups, classes, evaluate.critical_class,
                                              evaluate.bootstrap_samples, evaluate.confidence, seed)
    shares = {o: float(np.mean(orientations == o)) if len(labels) else 0.0 for o in ORIENTATIONS}
    return {"n_slices": int(len(labels)), "n_series": int(len(np.unique(groups))), "classes": classes,
            "min_series": cfg.min_series, "orientation_share": shares,
            "orientation_rule": {"coronal_min_aspect": CORONAL_MIN_ASPECT, "axial_max_aspect": AXIAL_MAX_ASPECT,
                                 "body_above_background": BODY_ABOVE_BACKGROUND},
            "composition": table, "warnings": thin_cells(table, cfg.min_series),
            "acquisition_baselines": {"folds": n_folds, "features": list(ACQUISITION_FEATURES),
                                      "thumbnail_size": cfg.thumbnail_size} | baselines}


def audit_metrics(report: dict) -> dict:
    """The flat numbers DVC shows and diffs."""
    baselines = report["acquisition_baselines"]
    return {"n_slices": report["n_slices"], "n_series": report["n_series"], "warnings": len(report["warnings"]),
            "orientation_share": report["orientation_share"],
            "series_by_orientation": {name: {o: cell["series"] for o, cell in row["by_orientation"].items()}
                                      for name, row in report["composition"].items()},
            "acquisition_baseline_macro_f1": {name: baselines[name]["macro_f1"]
                                              for name in ("intensity", "thumbnail") if name in baselines}}


def audit_markdown(report: dict) -> str:
    """A page a person reads: the composition table, the baselines and the warnings."""
    from tumorscope.models.evaluate import format_interval

    sources = sorted({s for row in report["composition"].values() for s in row["by_source"]})
    header = ["class", "slices", "series", *(f"{o} slices / series" for o in ORIENTATIONS),
              *(f"from {s} slices / series" for s in sources)]
    lines = ["# Dataset audit", "",
             f"{report['n_slices']} slices in {report['n_series']} series (duplicate groups). Orientation "
             f"from the body outline: " + ", ".join(f"{o} {share:.0%}" for o, share in report["orientation_share"].items())
             + ".", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, row in report["composition"].items():
        cells = [name, str(row["slices"]), str(row["series"]),
                 *(f"{row['by_orientation'][o]['slices']} / {row['by_orientation'][o]['series']}" for o in ORIENTATIONS),
                 *(f"{row['by_source'][s]['slices']} / {row['by_source'][s]['series']}" for s in sources)]
        lines.append("| " + " | ".join(cells) + " |")
    baselines = report["acquisition_baselines"]
    lines += ["", f"## What the acquisition alone predicts ({baselines['folds']} grouped folds)", "",
              "A logistic regression that sees no anatomy, only the slice's intensity statistics "
              f"({', '.join(baselines['features'])}) or a {baselines['thumbnail_size']}-px thumbnail. "
              "A model must beat these before it can be said to have learnt a finding.", "",
              "| baseline | macro-F1 [95 %] | critical-class recall |", "|---|---|---|"]
    for name in ("intensity", "thumbnail"):
        if name in baselines:
            score = baselines[name]
            recall = "-" if score["critical_recall"] is None else f"{score['critical_recall']:.3f}"
            lines.append(f"| {name} | {score['macro_f1']:.3f}{format_interval(score['macro_f1_ci'])} | {recall} |")
    lines += ["", "## Warnings", ""] + ([f"- {w}" for w in report["warnings"]] or ["None."])
    return "\n".join(lines) + "\n"
