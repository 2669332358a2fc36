"""A second labelled export of the same patients, scored only on each fold's held-out series.

In-source grouped cross-validation cannot see an export's processing: the training and test series
share it. The public kidney CT data exists in more than one export (kidney-ct-large is resized and
CLAHE-processed, kidney-ct-dev is raw; 1,308 file names are shared). Scoring every fold's model on
the *other* export's slices of that fold's test series shows what a model learnt that survives a
change of export. A slice of the other source may only be scored by a model that never trained on
its series, so each one is tied to a series (duplicate group) of the training source:

1. by file name (class folder and file name): the same slice in two exports;
2. otherwise by perceptual hash: its nearest training-source slice within ``phash_distance``
   (measured on the shared names: docs/evaluation.md);
3. a group of the other source's own near-duplicates takes the ties of all its members; one tied to
   series in different folds is not scored (it cannot be held out from every model that saw it).

A slice tied to nothing is never scored: its series may have been trained on unrecognised.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tumorscope.errors import UserError

UNTIED = -1


@dataclass
class CrossSource:
    paths: list[Path]
    labels: np.ndarray          # (N,) class index of the training source's classes
    names: list[str]            # "<class>/<file name>"
    phashes: list[str]          # 16 hex digits, as the manifest's
    pixels: list[np.ndarray]    # decoded greyscale, full size (prepared per variant's preprocess settings)
    unreadable: list[str]       # "<path>: <reason>" of files that could not be decoded (reported, not scored)


def list_labelled_files(root: Path, classes: list[str], extensions: list[str]) -> list[tuple[Path, str]]:
    """(file, class) of every image file under ``root/<class>/``; a class folder the training
    source does not have is a user mistake (its slices could not be scored)."""
    if not root.is_dir():
        raise UserError(f"cross_source.path: {root} is not a folder")
    folders = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(("_", ".")))
    unknown = [d.name for d in folders if d.name not in classes]
    if unknown:
        raise UserError(f"cross_source.path: {root} has class folder(s) {', '.join(map(repr, unknown))} that the "
                        f"training source lacks (its classes: {', '.join(classes)})")
    suffixes = {e.lower() for e in extensions}
    files = [(p, d.name) for d in folders for p in sorted(d.rglob("*")) if p.is_file() and p.suffix.lower() in suffixes]
    if not files:
        raise UserError(f"cross_source.path: no image files under {root}/<class>/")
    return files


def read_cross_source(root: Path, classes: list[str], extensions: list[str], window) -> CrossSource:
    """Decode and hash every slice of the other source (a corrupt file is listed, not dropped silently)."""
    from tumorscope.data.images import read_greyscale
    from tumorscope.data.manifest import phash_hex
    from tumorscope.progress import progress

    files = list_labelled_files(Path(root), classes, extensions)
    kept, unreadable = [], []
    for path, label in progress(files, len(files), "cross source"):
        try:
            pixels, _ = read_greyscale(path, window)
        except (OSError, ValueError, UserError) as err:
            unreadable.append(f"{path}: {err}")
            continue
        kept.append((path, label, pixels))
    return CrossSource(paths=[p for p, _, _ in kept], labels=np.array([classes.index(c) for _, c, _ in kept], dtype=np.int64),
                       names=[f"{c}/{p.name}" for p, c, _ in kept], phashes=[phash_hex(x) for _, _, x in kept],
                       pixels=[x for _, _, x in kept], unreadable=unreadable)


def prepared(source: CrossSource, preprocess) -> np.ndarray:
    """(N, S, S, 1) uint8 model inputs of the other source, by the one transform serving uses."""
    from tumorscope.data.preprocess import prepare_slice

    size = preprocess.image_size
    out = np.empty((len(source.pixels), size, size, 1), dtype=np.uint8)
    for i, pixels in enumerate(source.pixels):
        out[i, :, :, 0] = prepare_slice(pixels, preprocess)
    return out


def tie_to_series(names: list[str], phashes: list[str], own_groups: np.ndarray, main_names: list[str],
                  main_phashes: list[str], main_groups: np.ndarray, phash_distance: int) -> tuple[np.ndarray, np.ndarray]:
    """(N,) the training-source series each other-source slice belongs to (``UNTIED`` when none)
    and how it was tied ("name", "phash", "group": through a near-duplicate of its own source, or "").
    A member of an own group tied to several series keeps its own tie; untied members take the
    group's most common tie."""
    # The split's own blockwise Hamming distances (memory bounded by the block, not the whole matrix).
    from tumorscope.data.split import _hamming_blocks, phash_to_uint64

    by_name = {name: int(group) for name, group in zip(main_names, main_groups, strict=True)}
    tied = np.array([by_name.get(name, UNTIED) for name in names], dtype=np.int64)
    how = np.where(tied != UNTIED, "name", "").astype(object)
    need = np.flatnonzero(tied == UNTIED)
    if len(need) and len(main_phashes):
        query, reference = phash_to_uint64(np.asarray(phashes)[need]), phash_to_uint64(main_phashes)
        blocks = [(d.argmin(axis=1), d.min(axis=1)) for _, d in _hamming_blocks(query, reference, chunk=1024)]
        nearest, closest = np.concatenate([b[0] for b in blocks]), np.concatenate([b[1] for b in blocks])
        close = closest <= phash_distance
        tied[need[close]] = np.asarray(main_groups)[nearest[close]]
        how[need[close]] = "phash"
    own_groups = np.asarray(own_groups)
    for group in np.unique(own_groups):
        members = np.flatnonzero(own_groups == group)
        ties = tied[members][tied[members] != UNTIED]
        if len(ties):
            values, counts = np.unique(ties, return_counts=True)
            untied = members[tied[members] == UNTIED]
            tied[untied] = values[counts.argmax()]
            how[untied] = "group"
    return tied, how


def fold_of(tied: np.ndarray, own_groups: np.ndarray, main_groups: np.ndarray, main_folds: np.ndarray) -> np.ndarray:
    """(N,) the fold whose models never trained on each slice's series; ``UNTIED`` for a slice tied
    to nothing, or whose own near-duplicate group is tied to series in different folds."""
    fold_by_group = dict(zip(np.asarray(main_groups).tolist(), np.asarray(main_folds).tolist(), strict=True))
    folds = np.array([fold_by_group.get(int(group), UNTIED) if group != UNTIED else UNTIED for group in tied],
                     dtype=np.int64)
    own_groups = np.asarray(own_groups)
    for group in np.unique(own_groups):
        members = own_groups == group
        if len(set(folds[members].tolist()) - {UNTIED}) > 1:
            folds[members] = UNTIED
    return folds


def tie_summary(how: np.ndarray, folds: np.ndarray, unreadable: list[str]) -> dict:
    """How many slices were tied by name, hash or group, and how many are scored."""
    how = np.asarray(how, dtype=object)
    return {"n_slices": int(len(how)), "tied_by": {kind: int(np.sum(how == kind)) for kind in ("name", "phash", "group")},
            "untied": int(np.sum(how == "")), "scored": int(np.sum(folds != UNTIED)),
            "not_scored_ambiguous": int(np.sum((how != "") & (folds == UNTIED))),
            "unreadable": len(unreadable), "unreadable_files": unreadable[:20]}


@dataclass
class HeldOut:
    """The other source's slices with the fold whose models may score each (``UNTIED``: none)."""
    source: CrossSource
    series: np.ndarray          # (N,) the training-source series each slice is tied to
    folds: np.ndarray           # (N,) fold, or UNTIED
    summary: dict


def held_out_slices(root: str | Path, classes: list[str], extensions: list[str], window, main_names: list[str],
                    main_phashes: list[str], main_groups: np.ndarray, main_folds: np.ndarray, phash_distance: int,
                    own_threshold: int) -> HeldOut:
    """Read the other source and tie each slice to a series and so to a fold of the training source
    (``own_threshold``: the pHash distance that groups its own near-duplicates, split.phash_threshold)."""
    from tumorscope.data.split import duplicate_groups

    source = read_cross_source(Path(root), classes, extensions, window)
    own = duplicate_groups(source.phashes, source.phashes, own_threshold)  # identical hashes pair as exact twins
    series, how = tie_to_series(source.names, source.phashes, own, main_names, main_phashes, main_groups, phash_distance)
    folds = fold_of(series, own, main_groups, main_folds)
    # What a stored fold's scores of these slices depend on: which slices, tied to which fold.
    identity = json.dumps({"names": source.names, "phashes": source.phashes, "folds": folds.tolist()})
    return HeldOut(source, series, folds, tie_summary(how, folds, source.unreadable) | {
        "path": str(root), "phash_distance": phash_distance,
        "fingerprint": hashlib.sha256(identity.encode()).hexdigest()[:16]})
