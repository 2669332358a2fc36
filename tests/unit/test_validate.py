"""Great Expectations validation of the manifest: a good manifest passes; planted faults fail
naming the expectation that catches them."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from helpers.params import section
from tumorscope.config import ValidateConfig
from tumorscope.data.validate import class_count_table, validate_manifest

REPO_SUITES = Path(__file__).resolve().parents[2] / "expectations"
CLASSES = ["Cyst", "Normal", "Stone", "Tumor"]


def good_manifest(per_class: int = 12) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for label in CLASSES:
        for i in range(per_class):
            path = f"data/raw/{label}/img_{i:03d}.png"
            lo = float(rng.integers(0, 20))
            hi = float(rng.integers(200, 256))
            rows.append({
                "path": path, "label": label,
                "sha256": hashlib.sha256(path.encode()).hexdigest(),
                "phash": f"{int(rng.integers(0, 2**63)):016x}",
                "width": 128, "height": 128, "mode": "L",
                "mean": float(rng.uniform(60, 120)), "std": float(rng.uniform(20, 60)),
                "min": lo, "max": hi, "readable": True, "error": "",
            })
    return pd.DataFrame(rows)


def unreadable(frame: pd.DataFrame, index) -> pd.DataFrame:
    frame = frame.copy()
    frame.loc[index, ["phash", "mode"]] = ""
    frame.loc[index, ["width", "height"]] = 0
    frame.loc[index, ["mean", "std", "min", "max"]] = np.nan
    frame.loc[index, "readable"] = False
    frame.loc[index, "error"] = "cannot identify image file"
    return frame


def _unknown_label(m):
    m.loc[0, "label"] = "Banana"
    return m


def _too_many_unreadable(m):
    return unreadable(m, m.index[::6])  # 8 of 48 = 17% > 5%


def _too_small(m):
    m.loc[3, ["width", "height"]] = [16, 128]
    return m


def _blank(m):
    m.loc[5, ["std", "min", "max", "mean"]] = [0.0, 0.0, 0.0, 0.0]
    return m


def _missing_column(m):
    return m.drop(columns=["std"])


def _class_too_small(m):
    return m.drop(m.index[(m["label"] == "Stone")][4:])  # 4 Stone images < 10


def _class_absent(m):
    return m[m["label"] != "Tumor"]


def _min_over_max(m):
    m.loc[7, ["min", "max"]] = [200.0, 100.0]
    return m


def _duplicate_path(m):
    m.loc[1, "path"] = m.loc[0, "path"]
    return m


def _bad_sha(m):
    m.loc[2, "sha256"] = "XYZ"
    return m


CASES = {
    "unknown_label": (_unknown_label, "manifest: expect_column_values_to_be_in_set(label)", {}),
    "too_many_unreadable": (_too_many_unreadable,
                            "manifest: expect_column_values_to_be_in_set(readable)", {}),
    "too_small": (_too_small, "manifest: expect_column_values_to_be_between(width)", {}),
    "blank": (_blank, "manifest: expect_column_values_to_be_between(std)", {}),
    "missing_column": (_missing_column, "manifest: expect_column_to_exist(std)", {}),
    "class_too_small": (_class_too_small,
                        "class_counts: expect_column_values_to_be_between(count)", {}),
    # Stone 4 vs 12 elsewhere: imbalance 3 > 2 (the count floor is lowered out of the way).
    "imbalance": (_class_too_small,
                  "class_counts: expect_column_values_to_be_between(ratio_to_smallest)",
                  {"max_class_imbalance": 2.0, "min_images_per_class": 1}),
    "class_absent": (_class_absent,
                     "class_counts: expect_column_distinct_values_to_contain_set(label)", {}),
    "min_over_max": (_min_over_max,
                     "manifest: expect_column_pair_values_a_to_be_greater_than_b(max, min)", {}),
    "duplicate_path": (_duplicate_path, "manifest: expect_column_values_to_be_unique(path)", {}),
    "bad_sha": (_bad_sha, "manifest: expect_column_values_to_match_regex(sha256)", {}),
}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """Run every case once (GE import and context set-up are paid once for the module)."""
    root = tmp_path_factory.mktemp("validate")
    shutil.copytree(REPO_SUITES, root / "expectations")
    runs = {}
    good = good_manifest()
    # One unreadable file (2%) stays within max_quarantined_fraction and must not fail anything.
    runs["good"] = validate_manifest(unreadable(good, [10]), CLASSES, section(ValidateConfig), root)
    for name, (plant, _, overrides) in CASES.items():
        cfg = section(ValidateConfig, result_path=f"reports/{name}.json", docs_dir=f"reports/docs_{name}",
                             **overrides)
        runs[name] = validate_manifest(plant(good_manifest()), CLASSES, cfg, root)
    return runs


def test_good_manifest_passes(outcomes):
    outcome = outcomes["good"]
    assert outcome.success, outcome.summary()
    assert outcome.failed == []
    assert outcome.summary().startswith("validation passed: ")


def test_result_json_and_data_docs_written(outcomes):
    outcome = outcomes["good"]
    assert outcome.result_path.is_file()
    report = json.loads(outcome.result_path.read_text())
    assert report["success"] is True
    assert set(report["suites"]) == {"manifest", "class_counts"}
    assert report["statistics"]["unsuccessful_expectations"] == 0
    assert report["parameters"]["min_side"] == 32
    assert outcome.docs_index is not None and outcome.docs_index.is_file()
    assert outcome.docs_index.parent == outcome.result_path.parent / "data_docs"
    assert list((outcome.docs_index.parent / "validations").rglob("*.html"))


@pytest.mark.parametrize("case", sorted(CASES))
def test_planted_fault_fails_naming_the_expectation(outcomes, case):
    outcome = outcomes[case]
    expected = CASES[case][1]
    assert not outcome.success
    assert expected in outcome.failed, outcome.failed
    summary = outcome.summary()
    assert "\n" not in summary and summary.startswith("validation failed: ")
    assert expected in summary
    report = json.loads(outcome.result_path.read_text())
    assert report["success"] is False
    assert any(f["description"] in expected for f in report["failed"])


def test_failures_are_specific(outcomes):
    # A single planted fault does not drag unrelated expectations down with it.
    assert outcomes["unknown_label"].failed == [CASES["unknown_label"][1]]
    assert outcomes["too_small"].failed == [CASES["too_small"][1]]
    assert outcomes["blank"].failed == [CASES["blank"][1]]
    assert outcomes["class_too_small"].failed == [CASES["class_too_small"][1]]
    assert outcomes["imbalance"].failed == [CASES["imbalance"][1]]


def test_failed_result_records_observed_values(outcomes):
    report = json.loads(outcomes["unknown_label"].result_path.read_text())
    (failure,) = report["failed"]
    assert failure["observed"]["unexpected_count"] == 1
    assert failure["observed"]["partial_unexpected_list"] == ["Banana"]


def test_class_count_table():
    manifest = unreadable(good_manifest(), [0, 1])  # two unreadable Cyst files are not counted
    manifest.loc[manifest.index[-12:-6], "label"] = "Extra"
    table = class_count_table(manifest, CLASSES)
    assert list(table.columns) == ["label", "count", "share", "ratio_to_smallest"]
    # Unexpected labels are the manifest suite's business, not a class of their own here.
    assert table["label"].tolist() == ["Cyst", "Normal", "Stone", "Tumor"]
    assert table["count"].tolist() == [10, 12, 12, 6]
    assert table["share"].sum() == pytest.approx(1.0)
    assert table["ratio_to_smallest"].tolist() == pytest.approx([10 / 6, 2.0, 2.0, 1.0])


def test_class_count_table_absent_class_and_no_readable_rows():
    manifest = good_manifest()
    table = class_count_table(manifest[manifest["label"] != "Stone"], CLASSES)
    assert table["label"].tolist() == ["Cyst", "Normal", "Tumor"]
    empty = class_count_table(unreadable(manifest, manifest.index), CLASSES)
    assert empty.empty and list(empty.columns) == ["label", "count", "share", "ratio_to_smallest"]


def test_absolute_suite_dir(tmp_path):
    cfg = section(ValidateConfig, suite_dir=str(REPO_SUITES))
    outcome = validate_manifest(good_manifest(), CLASSES, cfg, tmp_path)
    assert outcome.success, outcome.summary()
    assert outcome.result_path == tmp_path / "reports" / "validation.json"
    assert not (tmp_path / "gx").exists()


def test_data_docs_depend_on_the_data_alone(outcomes, tmp_path):
    """The Data Docs are a DVC output: validating the same manifest again writes the same files,
    byte for byte (no run time in page names or tables), so a rerun or a clone changes nothing."""
    first = outcomes["good"].docs_index.parent
    shutil.copytree(REPO_SUITES, tmp_path / "expectations")
    again = validate_manifest(unreadable(good_manifest(), [10]), CLASSES, section(ValidateConfig), tmp_path)
    second = again.docs_index.parent

    def tree(root):
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    assert tree(first) == tree(second)
    assert not any("2026" in name or "2027" in name for name in tree(first))  # page paths hold no date
