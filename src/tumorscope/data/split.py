"""Leakage-aware, stratified train/val/test split.

Exact duplicates (same SHA-256) and near duplicates (perceptual-hash Hamming distance at or under
a threshold) are linked into groups by connected components (union-find), and whole groups are
assigned to splits. The public kidney CT data has no patient IDs, so this grouping is the only
guard against neighbouring slices of one patient landing in both train and test.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pandas as pd

SPLITS = ("train", "val", "test")


def phash_to_uint64(hex_hashes) -> np.ndarray:
    return np.array([int(h, 16) for h in hex_hashes], dtype=np.uint64)


def _hamming_blocks(query: np.ndarray, reference: np.ndarray, chunk: int):
    """(start, distances) for blocks of ``chunk`` query hashes against every reference hash, so
    memory stays chunk x len(reference) however many images there are."""
    for start in range(0, len(query), chunk):
        yield start, np.bitwise_count(query[start:start + chunk, None] ^ reference[None, :])


def near_pairs(hashes: np.ndarray, threshold: int, chunk: int = 1024) -> np.ndarray:
    """All index pairs (i < j) whose 64-bit hashes differ in at most ``threshold`` bits; shape (k, 2)."""
    found = []
    for start, distances in _hamming_blocks(hashes, hashes, chunk):
        rows, cols = np.nonzero(distances <= threshold)
        rows = rows + start
        keep = rows < cols
        found.append(np.stack([rows[keep], cols[keep]], axis=1))
    return np.concatenate(found) if found else np.empty((0, 2), dtype=np.int64)


def exact_pairs(sha256) -> np.ndarray:
    """Pairs linking each file to the first file with the same SHA-256."""
    first_seen: dict[str, int] = {}
    pairs = []
    for index, digest in enumerate(sha256):
        if digest in first_seen:
            pairs.append((first_seen[digest], index))
        else:
            first_seen[digest] = index
    return np.array(pairs, dtype=np.int64).reshape(-1, 2)


def duplicate_groups(sha256, phash_hex, threshold: int) -> np.ndarray:
    """Group id per image: connected components of the exact + near duplicate graph."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(sha256)
    pairs = np.concatenate([exact_pairs(sha256), near_pairs(phash_to_uint64(phash_hex), threshold)])
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    return labels


def assign_groups_to_splits(labels, groups, fractions: dict[str, float], seed: int) -> np.ndarray:
    """Assign whole groups to splits, largest groups first, each to the split least filled
    (relative to its per-class target) in the group's classes. Deterministic for a seed."""
    labels = np.asarray(labels)
    groups = np.asarray(groups)
    classes = sorted(set(labels))
    class_index = {c: i for i, c in enumerate(classes)}
    names = list(fractions)
    totals = np.array([np.sum(labels == c) for c in classes], dtype=float)
    targets = np.array([[fractions[s] * t for t in totals] for s in names])  # (split, class)
    filled = np.zeros_like(targets)

    composition: dict[int, np.ndarray] = {}
    for group, label in zip(groups, labels, strict=True):
        composition.setdefault(int(group), np.zeros(len(classes)))[class_index[label]] += 1
    rng = np.random.default_rng(seed)
    order = list(composition)
    rng.shuffle(order)  # random tie-break among equal sizes, then largest first
    order.sort(key=lambda g: -composition[g].sum())

    split_of_group = {}
    for group in order:
        counts = composition[group]
        # Weighted fill ratio of each split over the classes this group contains.
        ratios = (filled / np.maximum(targets, 1e-9)) @ counts / counts.sum()
        # Prefer the emptiest split; among equals, the larger one (train before val before test).
        best = min(range(len(names)), key=lambda s: (round(ratios[s], 12), -fractions[names[s]]))
        filled[best] += counts
        split_of_group[group] = names[best]
    return np.array([split_of_group[int(g)] for g in groups])


def grouped_folds(labels, groups, n_folds: int, seed: int) -> np.ndarray:
    """Fold index (0..n_folds-1) per image for grouped k-fold: whole duplicate groups per fold,
    each class spread as evenly as its groups allow (the split's own assignment, k equal parts)."""
    names = [str(fold) for fold in range(n_folds)]
    assigned = assign_groups_to_splits(labels, groups, {name: 1.0 / n_folds for name in names}, seed)
    return assigned.astype(np.int64)


def count_cross_split_leaks(sha256, phash_hex, splits, threshold: int) -> int:
    """Independent check: duplicate pairs (exact or near) whose members sit in different splits."""
    splits = np.asarray(splits)
    pairs = np.concatenate([exact_pairs(sha256), near_pairs(phash_to_uint64(phash_hex), threshold)])
    if len(pairs) == 0:
        return 0
    return int(np.sum(splits[pairs[:, 0]] != splits[pairs[:, 1]]))


def distance_profile(phash_hex, max_distance: int) -> dict[int, int]:
    """Number of image pairs at each Hamming distance 0..max_distance (to choose the threshold)."""
    hashes = phash_to_uint64(phash_hex)
    pairs = near_pairs(hashes, max_distance)
    distances = np.bitwise_count(hashes[pairs[:, 0]] ^ hashes[pairs[:, 1]]) if len(pairs) else []
    counted = Counter(int(d) for d in distances)
    return {d: counted.get(d, 0) for d in range(max_distance + 1)}


def nearest_distances(query_hex, reference_hex, chunk: int = 1024) -> np.ndarray:
    """For each query image, the smallest pHash Hamming distance to any reference image (64 where
    there is no reference): how close a test slice is to the training slices."""
    query, reference = phash_to_uint64(query_hex), phash_to_uint64(reference_hex)
    if len(reference) == 0:
        return np.full(len(query), 64, dtype=np.int64)
    nearest = [distances.min(axis=1) for _, distances in _hamming_blocks(query, reference, chunk)]
    return np.concatenate(nearest or [np.empty(0)]).astype(np.int64)


def _size_bucket(size: int) -> str:
    for low, high in ((1, 1), (2, 2), (3, 5), (6, 10), (11, 20), (21, 50), (51, 100)):
        if low <= size <= high:
            return str(low) if low == high else f"{low}-{high}"
    return ">100"


def split_report(frame: pd.DataFrame, fractions: dict[str, float], threshold: int, tolerance: float) -> dict:
    """Counts, achieved fractions, group sizes, class-spanning groups, unmet targets and leaks."""
    classes = sorted(frame["label"].unique())
    counts = {s: {c: int(((frame["split"] == s) & (frame["label"] == c)).sum()) for c in classes} for s in SPLITS}
    totals = {c: int((frame["label"] == c).sum()) for c in classes}
    achieved = {s: {c: counts[s][c] / totals[c] for c in classes} for s in SPLITS}

    sizes = frame.groupby("group").size()
    labels_per_group = frame.groupby("group")["label"].agg(lambda v: sorted(set(v)))
    spanning = [{"group": int(g), "size": int(sizes[g]), "labels": labels_per_group[g]}
                for g in labels_per_group.index if len(labels_per_group[g]) > 1]
    unmet = []
    for s in SPLITS:
        for c in classes:
            # One image is the finest step a small class can take.
            if abs(achieved[s][c] - fractions[s]) > max(tolerance, 1.0 / totals[c]):
                biggest = int(frame.loc[frame["label"] == c].groupby("group").size().max())
                unmet.append(
                    f"{s}/{c}: got {achieved[s][c]:.2f} of the class, wanted {fractions[s]:.2f} "
                    f"(largest '{c}' duplicate group has {biggest} of {totals[c]} images)"
                )
    leaks = count_cross_split_leaks(frame["sha256"], frame["phash"], frame["split"], threshold)
    return {
        "n_images": int(len(frame)),
        "phash_threshold": threshold,
        "fractions_wanted": fractions,
        "counts": counts,
        "fractions_achieved": achieved,
        "n_groups": int(len(sizes)),
        "largest_group": int(sizes.max()),
        "group_size_distribution": dict(sorted(Counter(_size_bucket(int(s)) for s in sizes).items())),
        "exact_duplicate_files": int(frame["sha256"].duplicated(keep=False).sum()),
        "groups_spanning_classes": spanning,
        "pairs_by_distance": distance_profile(frame["phash"], threshold + 4),
        "unmet_targets": unmet,
        "cross_split_leaks": leaks,
    }


def make_split(readable: pd.DataFrame, fractions: dict[str, float], threshold: int, seed: int) -> pd.DataFrame:
    """Readable manifest rows -> (path, label, sha256, phash, group, split)."""
    frame = readable[["path", "label", "sha256", "phash"]].reset_index(drop=True).copy()
    frame["group"] = duplicate_groups(frame["sha256"], frame["phash"], threshold)
    frame["split"] = assign_groups_to_splits(frame["label"], frame["group"], fractions, seed)
    return frame


def read_split_table(path: str) -> pd.DataFrame:
    """split.csv as written by the split stage (labels kept as text: a class folder named "NA" or
    "None" stays a label, as the cache saw it)."""
    from pathlib import Path

    from tumorscope.errors import UserError

    if not Path(path).is_file():
        raise UserError(f"{path} not found (run tumorscope split and preprocess first)")
    return pd.read_csv(path, keep_default_na=False)


def rows_in_cache_order(table: pd.DataFrame, classes: list[str], labels, splits: tuple[str, ...],
                        where: str) -> pd.DataFrame:
    """The split.csv rows of ``splits`` in the cache's order (split by split), checked against the
    cached labels: split.csv holds what the cache does not (paths, pHashes). ``where`` names the
    two files for the error message."""
    from tumorscope.errors import UserError

    rows = pd.concat([table[table["split"] == split] for split in splits])
    if len(rows) != len(labels) or [classes[i] for i in labels] != rows["label"].tolist():
        raise UserError(f"{where}: split table and cache do not match: rerun tumorscope preprocess")
    return rows
