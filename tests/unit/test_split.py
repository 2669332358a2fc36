import numpy as np
import pandas as pd
import pytest

from tumorscope.data.split import (
    assign_groups_to_splits,
    count_cross_split_leaks,
    duplicate_groups,
    make_split,
    near_pairs,
    nearest_distances,
    split_report,
)

FRACTIONS = {"train": 0.7, "val": 0.15, "test": 0.15}


def _hex(value: int) -> str:
    return f"{value:016x}"


def _planted_manifest(seed: int = 0) -> pd.DataFrame:
    """120 images; 10 exact-duplicate pairs, 10 near-duplicate chains of 4 (1-2 bits apart)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(120):
        rows.append({"path": f"img{i}.png", "label": ["A", "B", "C"][i % 3],
                     "sha256": f"{i:064x}", "phash": _hex(int(rng.integers(0, 2**63)))})
    frame = pd.DataFrame(rows)
    for k in range(10):  # exact duplicates: same bytes, different file names
        frame.loc[100 + k, ["sha256", "phash"]] = frame.loc[k, ["sha256", "phash"]].to_numpy()
    for k in range(10):  # near-duplicate chain: each one or two bits from the previous
        base = int(frame.loc[20 + k, "phash"], 16)
        for step, bit in enumerate((1, 5, 9), start=1):
            base ^= 1 << (bit + k)
            frame.loc[40 + 3 * k + step - 1, "phash"] = _hex(base)
            frame.loc[40 + 3 * k + step - 1, "label"] = frame.loc[20 + k, "label"]
    return frame


def test_near_pairs_matches_brute_force():
    rng = np.random.default_rng(1)
    hashes = rng.integers(0, 2**16, 300).astype(np.uint64)  # small values: many close pairs
    got = {tuple(p) for p in near_pairs(hashes, 3, chunk=64)}
    want = {(i, j) for i in range(300) for j in range(i + 1, 300)
            if bin(int(hashes[i]) ^ int(hashes[j])).count("1") <= 3}
    assert got == want and len(want) > 0


def test_duplicate_groups_link_exact_and_near_chains():
    frame = _planted_manifest()
    groups = duplicate_groups(frame["sha256"], frame["phash"], threshold=2)
    for k in range(10):
        assert groups[k] == groups[100 + k]  # exact twins together
        chain = [20 + k, 40 + 3 * k, 41 + 3 * k, 42 + 3 * k]
        assert len({groups[i] for i in chain}) == 1  # transitive chain is one group
    assert groups[0] != groups[1]


def test_split_has_no_leaks_with_planted_duplicates():
    frame = make_split(_planted_manifest(), FRACTIONS, threshold=2, seed=7)
    assert count_cross_split_leaks(frame["sha256"], frame["phash"], frame["split"], 2) == 0
    assert (frame.groupby("group")["split"].nunique() == 1).all()
    report = split_report(frame, FRACTIONS, 2, 0.05)
    assert report["cross_split_leaks"] == 0
    assert report["exact_duplicate_files"] == 20
    assert set(frame["split"]) == {"train", "val", "test"}


def test_leak_counter_catches_a_naive_random_split():
    frame = _planted_manifest()
    rng = np.random.default_rng(3)
    naive = rng.choice(["train", "val", "test"], size=len(frame), p=[0.7, 0.15, 0.15])
    assert count_cross_split_leaks(frame["sha256"], frame["phash"], naive, 2) > 0


def test_split_is_deterministic_and_stratified():
    labels = np.array(["A"] * 100 + ["B"] * 40)
    groups = np.arange(140)
    first = assign_groups_to_splits(labels, groups, FRACTIONS, seed=1)
    assert (first == assign_groups_to_splits(labels, groups, FRACTIONS, seed=1)).all()
    for label, total in (("A", 100), ("B", 40)):
        share = np.mean(first[labels == label] == "test")
        assert share == pytest.approx(0.15, abs=1.0 / total + 1e-9)


def test_report_says_when_a_group_is_too_big():
    frame = pd.DataFrame({"path": [f"p{i}" for i in range(20)], "label": ["A"] * 20,
                          "sha256": [f"{i:064x}" for i in range(20)], "phash": [_hex(0)] * 20})
    frame.loc[15:, "phash"] = [_hex(2**40 - 1 - i) for i in range(5)]
    split = make_split(frame, FRACTIONS, threshold=4, seed=0)
    report = split_report(split, FRACTIONS, 4, 0.05)
    assert report["largest_group"] == 15
    assert report["unmet_targets"] and "largest 'A' duplicate group has 15" in report["unmet_targets"][0]
    assert report["cross_split_leaks"] == 0


def test_groups_spanning_classes_are_reported_and_kept_whole():
    frame = pd.DataFrame({"path": ["a", "b", "c"], "label": ["A", "B", "A"],
                          "sha256": ["1" * 64, "1" * 64, "2" * 64], "phash": [_hex(1), _hex(1), _hex(2**50)]})
    split = make_split(frame, FRACTIONS, threshold=0, seed=0)
    report = split_report(split, FRACTIONS, 0, 0.05)
    assert report["groups_spanning_classes"] == [{"group": int(split.loc[0, "group"]), "size": 2, "labels": ["A", "B"]}]
    assert split.loc[0, "split"] == split.loc[1, "split"]


def test_nearest_distances_to_the_reference_set():
    reference = [_hex(0), _hex(0b1111 << 40)]
    query = [_hex(0b1), _hex(0b111 << 40), _hex((1 << 64) - 1)]
    # 1 bit from 0; 1 bit from the second reference; all 64 bits differ from 0, 60 from the other
    assert nearest_distances(query, reference).tolist() == [1, 1, 60]
    assert nearest_distances(query, []).tolist() == [64, 64, 64]
    assert nearest_distances([], reference).tolist() == []
