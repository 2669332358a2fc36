"""The dataset audit (tumorscope.data.audit) and the shortcut checks of an evaluation
(tumorscope.models.shortcuts): orientation from the body outline, composition and its warnings,
acquisition-only baselines that catch a shortcut and do not invent one."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from helpers.paths import FIXTURE_SLICES
from tumorscope.data import audit
from tumorscope.models import shortcuts
from tumorscope.stages.audit import source_of

EVALUATE = SimpleNamespace(bootstrap_samples=200, confidence=0.95, critical_class="Tumor", calibration_bins=10,
                           max_single_class_share=0.95)
CLASSES = ["Cyst", "Normal", "Stone", "Tumor"]
# Judged by eye (the coronal reconstructions show the trunk from the front, filling the field).
CORONAL_FIXTURES = {"Cyst- (1).jpg", "Cyst- (33).jpg", "Cyst- (41).jpg", "Cyst- (49).jpg", "Stone- (33).jpg"}


def axial_like(size: int = 96, background: int = 0, body: int = 110) -> np.ndarray:
    """A wide ellipse (the trunk's cross-section) with a thin curved table under it."""
    rows, cols = np.mgrid[:size, :size]
    image = np.full((size, size), background, np.uint8)
    image[((rows - 0.45 * size) / (0.25 * size)) ** 2 + ((cols - size / 2) / (0.42 * size)) ** 2 <= 1] = body
    image[int(0.8 * size), int(0.1 * size):int(0.9 * size)] = body  # the table: one row, cut off by the opening
    return image


def coronal_like(size: int = 96, background: int = 0, body: int = 110) -> np.ndarray:
    """The trunk from the front: taller than wide, from the top of the field to its bottom."""
    image = np.full((size, size), background, np.uint8)
    image[:, int(0.3 * size):int(0.7 * size)] = body
    return image


def test_the_body_outline_tells_axial_from_coronal_whatever_the_air_level():
    for background in (0, 40):  # a processed export lifts the air's grey level
        images = np.stack([axial_like(background=background), coronal_like(background=background),
                           np.full((96, 96), background, np.uint8)])
        assert audit.estimate_orientations(images).tolist() == ["axial", "coronal", "other"]
    square = np.zeros((96, 96), np.uint8)
    square[20:76, 20:76] = 120
    assert audit.estimate_orientations(square[None]).tolist() == ["other"]  # the outline cannot tell


def test_real_slices_get_the_orientation_a_reader_sees():
    paths = sorted(p for p in FIXTURE_SLICES.glob("*/*.jpg"))
    images = np.stack([np.asarray(Image.open(p).convert("L").resize((96, 96), Image.BILINEAR)) for p in paths])
    expected = ["coronal" if p.name in CORONAL_FIXTURES else "axial" for p in paths]
    assert audit.estimate_orientations(images[..., None]).tolist() == expected


def test_masking_the_body_leaves_only_air_table_and_border():
    image = axial_like(background=12)
    image[5, 5] = 200  # something in the border
    masked = audit.mask_body(image[None, ..., None])[0, ..., 0]
    body = audit.body_mask(image)
    assert body.sum() > 1000 and np.all(masked[body] == 12)
    assert np.array_equal(masked[~body], image[~body])
    assert image[48, 48] == 110  # the input is left alone


def test_composition_counts_series_and_warns_only_where_the_data_set_has_slices():
    labels = np.array([0, 0, 0, 1, 1, 1])
    groups = np.array([1, 2, 3, 4, 4, 5])
    orientations = np.array(["axial", "axial", "coronal", "axial", "axial", "other"], dtype=object)
    sources = np.array(["data.source"] * 5 + ["added/b1"], dtype=object)
    table = audit.composition(labels, groups, orientations, sources, ["Cyst", "Normal"])
    assert table["Cyst"]["by_orientation"]["axial"] == {"slices": 2, "series": 2}
    assert table["Normal"]["by_orientation"]["axial"] == {"slices": 2, "series": 1}
    assert table["Normal"]["by_source"]["added/b1"] == {"slices": 1, "series": 1}
    warnings = audit.thin_cells(table, min_series=2)
    # Normal has 1 axial series and no coronal one; "other" is the estimator's doubt, not warned.
    assert [w.split(" (<")[0] for w in warnings] == [
        "Cyst: 1 coronal series", "Normal: 1 axial series", "Normal: 0 coronal series",
        "Cyst: 0 added/b1 series", "Normal: 1 added/b1 series", "Normal: 1 data.source series"]
    assert not any("other" in w for w in warnings)
    assert audit.thin_cells(table, min_series=1) == ["Normal: 0 coronal series (< audit.min_series 1): a model "
                                                     "cannot learn Normal on coronal slices for unseen patients "
                                                     "(orientation 'coronal')",
                                                     "Cyst: 0 added/b1 series (< audit.min_series 1): a model "
                                                     "cannot learn Cyst on added/b1 slices for unseen patients "
                                                     "(source 'added/b1')"]


def _slices(brightness_by_class: bool, n: int = 160, seed: int = 0):
    """Textured axial slices, 8 per series; with ``brightness_by_class`` each class is scanned brighter."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(4), n // 4)
    groups = np.arange(n) // 8
    images = []
    for label in labels:
        body = 90 + (25 * label if brightness_by_class else 0)
        image = axial_like(body=body).astype(np.int16) + rng.integers(-20, 21, (96, 96))
        images.append(np.clip(image, 0, 255).astype(np.uint8))
    return np.stack(images)[..., None], labels, groups


def test_the_acquisition_baseline_finds_a_brightness_shortcut_and_invents_none():
    cfg = SimpleNamespace(folds=4, thumbnail_size=8, min_series=2)
    sources = np.array(["data.source"] * 160, dtype=object)
    images, labels, groups = _slices(brightness_by_class=True)
    found = audit.audit_dataset(images, labels, groups, sources, CLASSES, cfg, EVALUATE, seed=0)
    assert found["acquisition_baselines"]["intensity"]["macro_f1"] > 0.9
    images, labels, groups = _slices(brightness_by_class=False)
    none = audit.audit_dataset(images, labels, groups, sources, CLASSES, cfg, EVALUATE, seed=0)
    assert none["acquisition_baselines"]["intensity"]["macro_f1"] < 0.5  # 4 classes: chance is 0.25
    assert none["orientation_share"]["axial"] == 1.0 and none["warnings"] == []
    metrics = audit.audit_metrics(none)
    assert metrics["series_by_orientation"]["Tumor"] == {"axial": 5, "coronal": 0, "other": 0}
    assert "| Tumor | 40 | 5 | 40 / 5 | 0 / 0 | 0 / 0 | 40 / 5 |" in audit.audit_markdown(none)


def test_a_model_beats_a_baseline_only_when_its_paired_interval_is_above_zero():
    images, labels, groups = _slices(brightness_by_class=True)
    train, test = slice(0, None, 2), slice(1, None, 2)
    perfect = np.eye(4)[labels[test]]
    test_set = (images[test], labels[test], groups[test])
    masked = np.full((len(perfect), 4), 0.25)
    beaten = shortcuts.shortcut_audit((images[train], labels[train]), test_set, perfect, masked, CLASSES, 8,
                                      EVALUATE, seed=0)
    # Brightness gives every class away here: the baselines are perfect too, so nothing is beaten.
    assert not beaten["beats_acquisition_baselines"]
    assert beaten["acquisition_baselines"]["intensity"]["model_minus_baseline"]["low"] == pytest.approx(0.0)
    images, labels, groups = _slices(brightness_by_class=False)
    perfect = np.eye(4)[labels[test]]
    fair = shortcuts.shortcut_audit((images[train], labels[train]), (images[test], labels[test], groups[test]),
                                    perfect, masked, CLASSES, 8, EVALUATE, seed=0)
    assert fair["beats_acquisition_baselines"]
    assert set(fair["by_orientation"]) == {"axial"} and fair["by_orientation"]["axial"]["macro_f1"] == 1.0
    assert fair["masked_body"]["majority_share"] == 0.25
    line = shortcuts.shortcut_line(fair)
    assert "beats the intensity baseline" in line and "axial 1.000" in line
    metrics = shortcuts.shortcut_metrics(fair)
    assert metrics["beats_acquisition_baselines"] is True and metrics["by_orientation"]["axial"]["n"] == 80


def test_the_source_of_a_slice_is_data_source_or_its_added_batch():
    assert source_of("data/raw/Cyst/a.jpg", "data/raw") == "data.source"
    assert source_of("data/raw/Cyst/added/2026-12/sub/a.jpg", "data/raw") == "added/2026-12"
    assert source_of("elsewhere/a.jpg", "data/raw") == "data.source"
