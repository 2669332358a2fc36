"""The generalisation levers do what they say: the body crop keeps the body and drops air, table
and border; percentile normalisation stretches; intensity augmentation stays in its bounds; the
balanced sampler draws every class equally; test-time augmentation averages the slice and its
mirror; the ablation's pure parts (subsampling, paired differences) behave."""

from __future__ import annotations

import numpy as np
import pytest

from helpers.params import section
from tumorscope.config import PreprocessConfig
from tumorscope.data.augment import augment_intensity
from tumorscope.data.preprocess import crop_to_body, field_of_view, prepare_slice, stretch_percentiles
from tumorscope.inference import predict_proba, tta_views
from tumorscope.models.ablation import markdown_table, paired_differences, training_subsample, verdict
from tumorscope.models.train import balanced_order


def ct_like(rows: int = 200, cols: int = 300) -> np.ndarray:
    """A disk of 'body' off centre in a wide black frame, with a bright thin 'table' below it."""
    y, x = np.mgrid[:rows, :cols]
    image = np.zeros((rows, cols), np.uint8)
    image[(y - 90) ** 2 + (x - 120) ** 2 <= 60 ** 2] = 120
    image[185:188, 10:290] = 200  # the table: 3 px thick, wider than the body
    return image


def test_the_body_crop_keeps_the_body_and_drops_border_and_table():
    image = ct_like()
    cropped = crop_to_body(image)
    assert cropped.shape[0] == cropped.shape[1] and 115 <= cropped.shape[0] <= 125  # the disk's diameter
    assert (cropped == 120).sum() == (image == 120).sum()  # all of the body
    assert not (cropped == 200).any()  # none of the table
    assert field_of_view(image, section(PreprocessConfig)) is image  # off by default
    blank = np.zeros((64, 64), np.uint8)
    assert crop_to_body(blank) is blank  # nothing to crop to: unchanged
    prepared = prepare_slice(image, section(PreprocessConfig, image_size=32, body_crop=True))
    assert prepared.shape == (32, 32) and (prepared > 20).mean() > 0.6  # the body fills the input


def test_percentile_normalisation_stretches_and_keeps_order():
    rng = np.random.default_rng(0)
    dull = rng.integers(100, 141, (64, 64)).astype(np.uint8)
    stretched = stretch_percentiles(dull)
    assert stretched.min() == 0 and stretched.max() == 255
    order = np.argsort(dull.ravel(), kind="stable")
    assert np.all(np.diff(stretched.ravel()[order].astype(int)) >= 0)  # monotone
    flat = np.full((16, 16), 7, np.uint8)
    assert np.array_equal(stretch_percentiles(flat), flat)
    prepared = prepare_slice(dull, section(PreprocessConfig, image_size=32, normalize="percentile"))
    assert prepared.max() - prepared.min() > 200


def test_intensity_augmentation_stays_in_its_bounds():
    rng = np.random.default_rng(1)
    batch = rng.integers(60, 200, (16, 32, 32, 1)).astype(np.uint8)
    assert augment_intensity(batch, 0.0, rng) is batch
    strength = 0.2
    out = augment_intensity(batch, strength, np.random.default_rng(2))
    assert out.dtype == np.uint8 and out.shape == batch.shape
    assert np.array_equal(out, augment_intensity(batch, strength, np.random.default_rng(2)))  # seeded
    shifts = np.abs(out.astype(float).mean(axis=(1, 2, 3)) - batch.astype(float).mean(axis=(1, 2, 3)))
    # contrast about mid-grey, brightness <= 0.2 * 64 and gamma in [0.8, 1.2] move a mean of ~130 by
    # well under 60 grey levels; the images are changed differently.
    assert shifts.max() < 60 and len(np.unique(np.round(shifts, 3))) > 8


def test_balanced_order_draws_each_class_equally_from_its_own_slices():
    labels = np.array([0] * 90 + [1] * 8 + [2] * 2)
    order = balanced_order(labels, np.random.default_rng(3))
    assert len(order) == len(labels)
    counts = np.bincount(labels[order], minlength=3)
    assert counts.max() - counts.min() <= 1  # 34 / 33 / 33
    assert set(order[labels[order] == 2]) <= {98, 99}


def test_training_subsample_keeps_a_share_of_whole_series_the_same_for_every_variant():
    groups = np.repeat(np.arange(20), 5)
    train = groups < 16
    half = training_subsample(train, groups, 0.5, seed=4, fold=1)
    assert not np.any(half & ~train) and len(np.unique(groups[half])) == 8
    assert all(half[groups == g].all() for g in np.unique(groups[half]))  # whole series
    assert np.array_equal(half, training_subsample(train, groups, 0.5, seed=4, fold=1))
    assert not np.array_equal(half, training_subsample(train, groups, 0.5, seed=4, fold=2))
    assert training_subsample(train, groups, 1.0, 4, 1) is train


def test_paired_differences_are_zero_for_the_same_answers_and_positive_for_better_ones():
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 4, 400)
    groups = np.repeat(np.arange(80), 5)
    noisy = np.where(rng.random(400) < 0.5, labels, rng.integers(0, 4, 400))
    same = paired_differences(labels, noisy, noisy, groups, 4, 3, 200, 0.95, 0)
    assert same["macro_f1"] == {"value": 0.0, "low": 0.0, "high": 0.0} and verdict(same["macro_f1"]) == "no clear difference"
    better = paired_differences(labels, labels, noisy, groups, 4, 3, 200, 0.95, 0)
    assert better["macro_f1"]["low"] > 0 and better["critical_recall"]["low"] > 0
    assert verdict(better["macro_f1"]) == "better"
    assert verdict(paired_differences(labels, noisy, labels, groups, 4, None, 200, 0.95, 0)["macro_f1"]) == "worse"


def test_the_markdown_table_has_a_row_per_variant():
    scores = {"macro_f1": {"value": 0.5, "low": 0.4, "high": 0.6}, "critical_recall": None, "ece": 0.1}
    report = {"critical_class": "Tumor", "variants": {
        "baseline": {"overrides": {}, "train_share": 1.0, "scores": scores, "seconds": 60.0},
        "crop": {"overrides": {"preprocess": {"body_crop": True}}, "train_share": 1.0, "scores": scores, "seconds": 90.0,
                 "difference": {"macro_f1": {"value": 0.02, "low": -0.01, "high": 0.05}}, "verdict": "no clear difference"}}}
    table = markdown_table(report).splitlines()
    assert len(table) == 4 and table[2].startswith("| baseline | `(defaults)` | 100% | 0.500 [0.400, 0.600] | - |")
    assert "+0.020 [-0.010, +0.050]" in table[3] and "no clear difference" in table[3] and "| 1.5 | - |" in table[3]
    # With another export its columns come first and the verdict follows them; the in-source one stays.
    cross = {"n": 40, "macro_f1": {"value": 0.3, "low": 0.2, "high": 0.4}, "critical_recall": None, "ece": 0.2,
             "risk_coverage": {"max_coverage_at_target": 0.25}}
    report["cross_source"] = {"path": "other"}
    report["variants"]["baseline"]["cross_scores"] = cross
    report["variants"]["crop"] |= {"cross_scores": cross, "verdict": "better", "in_source_verdict": "no clear difference",
                                   "cross_difference": {"macro_f1": {"value": 0.1, "low": 0.05, "high": 0.15}}}
    table = markdown_table(report).splitlines()
    assert table[0].startswith("| variant | overrides | training series | cross-export macro-F1 [95 %] |")
    assert table[3].startswith("| crop | `{\"preprocess\": {\"body_crop\": true}}` | 100% | 0.300 [0.200, 0.400] | - | "
                               "0.200 | 25% | +0.100 [+0.050, +0.150] | 0.500")
    assert "| better | no clear difference | 1.5 | - |" in table[3]
    assert all(row.count("|") == table[0].count("|") for row in table)


@pytest.mark.parametrize(("key", "bad"), [("variants", {"a": {}}), ("variants", {"baseline": {"split": {"phash_threshold": 2}}}),
                                          ("learning_curve", [1.5])])
def test_ablation_config_refuses_what_would_break_the_pairing(key, bad):
    from helpers.params import params_where
    from tumorscope.config import ConfigError

    with pytest.raises(ConfigError, match="ablation"):
        params_where(f"ablation.{key}", bad)


def test_the_cache_and_the_service_prepare_a_cropped_normalised_slice_alike(tmp_path):
    """With the levers on, an upload is prepared exactly as the training cache holds it."""
    import pandas as pd
    from PIL import Image

    from tumorscope.config import WindowConfig
    from tumorscope.data.preprocess import build_cache, load_split
    from tumorscope.inference import input_spec, prepare_bytes

    path = tmp_path / "slice.png"
    Image.fromarray(ct_like()).save(path)
    cfg = section(PreprocessConfig, cache_dir=str(tmp_path / "cache"), image_size=32, body_crop=True, normalize="percentile")
    table = pd.DataFrame({"path": [str(path)] * 3, "split": ["train", "val", "test"], "label": ["Tumor"] * 3,
                          "group": [0, 1, 2]})
    build_cache(table, ["Tumor"], cfg, section(WindowConfig))
    cached = load_split(cfg.cache_dir, "test")[0][0]
    prepared = prepare_bytes(path.read_bytes(), ".png", input_spec(["Tumor"], cfg, section(WindowConfig)))
    assert np.array_equal(prepared.pixels, cached)
    assert prepared.view is not None and prepared.view.shape[0] < prepared.decoded.shape[0]  # the overlay's field of view
    assert prepared.original_shape == (200, 300)  # monitoring still sees the file's size


def test_a_stored_fold_survives_a_param_added_at_its_default_not_a_changed_setting():
    from tumorscope.models.ablation import same_settings

    stored = {"train.lr": 0.001, "preprocess.image_size": 64}
    defaults = {"train.lr": 0.001, "preprocess.image_size": 64, "train.tta": False}
    assert same_settings(stored, dict(stored), defaults)
    assert same_settings(stored, stored | {"train.tta": False}, defaults)  # a new lever, off
    assert not same_settings(stored, stored | {"train.tta": True}, defaults)  # a new lever, on
    assert not same_settings(stored, stored | {"preprocess.image_size": 96}, defaults | {"preprocess.image_size": 96})
    assert not same_settings(stored, {"train.lr": 0.001}, defaults)  # a setting that no longer exists


class LeftHeavyModel:
    """Two classes: P(left) grows with the share of the slice's brightness in its left half, so a
    mirrored slice gets the mirrored answer. Records the batches it was given."""

    output_shape = (None, 2)

    def __init__(self) -> None:
        self.batches: list[np.ndarray] = []

    def predict_on_batch(self, batch: np.ndarray) -> np.ndarray:
        self.batches.append(batch)
        half = batch.shape[2] // 2
        left = batch[:, :, :half].astype(float).sum(axis=(1, 2, 3))
        total = batch.astype(float).sum(axis=(1, 2, 3)) + 1e-9
        p_left = 0.1 + 0.8 * left / total
        return np.stack([p_left, 1 - p_left], axis=1)


def test_test_time_augmentation_averages_the_slice_and_its_mirror():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (5, 8, 8, 1), dtype=np.uint8)
    images[0, :, :4] = 255  # bright on the left only
    images[0, :, 4:] = 0
    model = LeftHeavyModel()
    one_view = predict_proba(model, images)
    mirrored = predict_proba(model, images[:, :, ::-1])
    model.batches.clear()
    averaged = predict_proba(model, images, batch_size=2, test_time_augmentation="flip")
    np.testing.assert_allclose(averaged, (one_view + mirrored) / 2)
    assert one_view[0, 0] == pytest.approx(0.9) and averaged[0, 0] == pytest.approx(0.5)  # left and mirror cancel
    assert np.allclose(averaged.sum(axis=1), 1)
    assert [len(b) for b in model.batches] == [2, 2, 2, 2, 1, 1]  # each batch and its mirror
    assert [v.shape for v in tta_views(images, "none")] == [images.shape]
    with pytest.raises(ValueError, match="unknown test-time augmentation"):
        tta_views(images, "rotate")


def test_risk_coverage_decides_the_confident_slices_first():
    from tumorscope.trust.assessment import coverage_at_accuracy as risk_coverage

    labels = np.array([0, 1, 2, 3, 0, 1, 2, 3, 0, 1])
    probabilities = np.full((10, 4), 0.1)
    # the four most confident are right, the next six are wrong
    for i in range(10):
        probabilities[i, labels[i] if i < 4 else (labels[i] + 1) % 4] = 0.9 - 0.05 * i
    curve = risk_coverage(labels, probabilities, target_accuracy=0.9, points=5)
    assert curve["max_coverage_at_target"] == 0.4
    assert [round(p["coverage"], 1) for p in curve["curve"]] == [0.2, 0.4, 0.6, 0.8, 1.0]
    assert curve["curve"][1]["accuracy"] == 1.0 and curve["curve"][-1]["accuracy"] == 0.4
    assert risk_coverage(labels, np.roll(np.eye(4)[labels], 1, axis=1))["max_coverage_at_target"] == 0.0
