"""Tying another export's slices to the training source's series and folds
(tumorscope.data.cross_source): a slice is scored only by models that never trained on its series."""

from __future__ import annotations

import numpy as np
import pytest

from helpers.images import write_png
from tumorscope.data.cross_source import UNTIED, fold_of, list_labelled_files, tie_summary, tie_to_series
from tumorscope.errors import UserError

MAIN_NAMES = ["Cyst/a.jpg", "Cyst/b.jpg", "Tumor/c.jpg", "Tumor/d.jpg"]
MAIN_HASHES = ["0000000000000000", "00000000000000ff", "ffffffffffffffff", "ffffffffffff0000"]
MAIN_GROUPS = np.array([10, 11, 20, 21])
MAIN_FOLDS = np.array([0, 1, 0, 2])


def test_a_slice_is_tied_by_name_first_then_by_hash_then_through_its_own_near_duplicates():
    names = ["Cyst/b.jpg", "Cyst/x.jpg", "Tumor/y.jpg", "Tumor/z.jpg", "Cyst/far.jpg"]
    # b by name (although its hash is a's); x by hash to a (distance 1); y nowhere near, but its own
    # group holds z, whose hash is d's (distance 2); far is near nothing and alone.
    hashes = ["0000000000000000", "0000000000000001", "0f0f0f0f0f0f0f0f", "ffffffffffff0003", "00ff00ff00ff00ff"]
    own = np.array([0, 1, 2, 2, 3])
    series, how = tie_to_series(names, hashes, own, MAIN_NAMES, MAIN_HASHES, MAIN_GROUPS, phash_distance=4)
    assert series.tolist() == [11, 10, 21, 21, UNTIED]
    assert how.tolist() == ["name", "phash", "group", "phash", ""]
    folds = fold_of(series, own, MAIN_GROUPS, MAIN_FOLDS)
    assert folds.tolist() == [1, 0, 2, 2, UNTIED]
    summary = tie_summary(how, folds, ["bad.jpg: truncated"])
    assert summary["tied_by"] == {"name": 1, "phash": 2, "group": 1} and summary["scored"] == 4
    assert summary["untied"] == 1 and summary["unreadable"] == 1


def test_a_near_duplicate_group_tied_to_series_of_two_folds_is_not_scored():
    # Both slices are one series in the other export, but one is a's twin (fold 0), the other b's (fold 1).
    series, _ = tie_to_series(["Cyst/a.jpg", "Cyst/b.jpg"], ["0", "0"], np.array([5, 5]), MAIN_NAMES, MAIN_HASHES,
                              MAIN_GROUPS, phash_distance=0)
    assert fold_of(series, np.array([5, 5]), MAIN_GROUPS, MAIN_FOLDS).tolist() == [UNTIED, UNTIED]


def test_the_other_source_must_use_the_training_sources_classes(tmp_path):
    write_png(tmp_path / "Cyst" / "a.png", np.full((8, 8), 90, np.uint8))
    assert [label for _, label in list_labelled_files(tmp_path, ["Cyst", "Tumor"], [".png"])] == ["Cyst"]
    write_png(tmp_path / "Kidney" / "b.png", np.full((8, 8), 90, np.uint8))
    with pytest.raises(UserError, match="class folder\\(s\\) 'Kidney' that the training source lacks"):
        list_labelled_files(tmp_path, ["Cyst", "Tumor"], [".png"])
    with pytest.raises(UserError, match="is not a folder"):
        list_labelled_files(tmp_path / "missing", ["Cyst"], [".png"])
