"""Ingest a class-per-folder image set (or the phantom's output) into the immutable raw folder.

Accepts the public Kaggle "CT KIDNEY DATASET: Normal-Cyst-Tumor-Stone" as downloaded (a wrapper
folder of the same name around the class folders, plus ``kidneyData.csv``), or any folder whose
sub-folders are classes. Every file inside a class folder is copied, images or not: deciding what
is readable is the manifest's job, so nothing is dropped here without a trace.

Labelled batches added later (new scans, a drift window a team has labelled) live in
``data.added_dir``, one class-per-folder sub-folder per batch; each is copied into
``raw_dir/<label>/added/<batch>/...`` beside the source's files, whose paths do not change: the
next data version is old + new, never new instead of old.

``raw_dir`` is a generated copy, rebuilt whole on every run. Two rules keep that from ever costing
source data: the source may not be, contain or sit inside any pipeline output folder (checked
before anything is touched), and the new copy is built in a sibling work folder that replaces the
old one only once every file was copied.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tumorscope.config import DataConfig
from tumorscope.errors import UserError

METADATA_SUFFIXES = {".csv", ".txt", ".md", ".json"}
RAW_DIR_KEY = "data.raw_dir"
# Siblings of raw_dir that ingest itself creates and deletes while swapping in a new copy.
WORK_SUFFIX = ".tmp-ingest"
OLD_SUFFIX = ".old-ingest"


def _is_hidden(path: Path) -> bool:
    # "_name" folders hold side data (e.g. the phantom's masks); ".name" are OS/tool files.
    return path.name.startswith((".", "_"))


@dataclass
class IngestReport:
    source: str
    class_root: str
    files_per_label: dict[str, int] = field(default_factory=dict)
    folders_per_label: dict[str, list[str]] = field(default_factory=dict)
    excluded_folders: list[str] = field(default_factory=list)
    skipped_hidden_files: list[str] = field(default_factory=list)
    metadata_files: list[str] = field(default_factory=list)
    added_batches: dict[str, dict[str, int]] = field(default_factory=dict)  # batch -> label -> files

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def find_class_root(source: Path, image_extensions: list[str]) -> Path:
    """Descend through wrapper folders (one sub-folder, no images) to the folder of class folders."""
    extensions = {e.lower() for e in image_extensions}
    current = source
    while True:
        children = [c for c in sorted(current.iterdir()) if not _is_hidden(c)]
        subdirs = [c for c in children if c.is_dir()]
        has_images = any(c.is_file() and c.suffix.lower() in extensions for c in children)
        if len(subdirs) == 1 and not has_images:
            current = subdirs[0]
            continue
        return current


def resolve_class_folders(class_root: Path, class_map: dict[str, str | None],
                          partial: bool = False) -> tuple[dict[str, list[Path]], list[str]]:
    """Return ({label: [class folders]}, excluded folder names) after applying the class map.
    ``partial``: an added batch may hold only some of the mapped class folders."""
    folders = {d.name: d for d in sorted(class_root.iterdir()) if d.is_dir() and not _is_hidden(d)}
    if not folders:
        raise UserError(f"no class folders found in {class_root} (expected one sub-folder per class)")
    if not class_map:
        return {name: [path] for name, path in folders.items()}, []
    unknown = sorted(set(class_map) - set(folders))
    if partial:
        class_map = {name: label for name, label in class_map.items() if name in folders}
        unmapped = sorted(set(folders) - set(class_map))
        if unmapped:
            raise UserError(f"{class_root}: class folder(s) {unmapped} are not in data.class_map "
                            f"(mapped: {sorted(class_map)})")
    elif unknown:
        raise UserError(
            f"data.class_map names class folder(s) {unknown} that do not exist in {class_root} "
            f"(found: {sorted(folders)})"
        )
    by_label: dict[str, list[Path]] = {}
    for name, label in class_map.items():
        if label is not None:
            by_label.setdefault(label, []).append(folders[name])
    if not by_label:
        raise UserError("data.class_map maps every folder to null: no class left to train on")
    excluded = sorted(set(folders) - {n for n, lab in class_map.items() if lab is not None})
    return by_label, excluded


def _class_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """All regular files under a class folder: (kept, hidden)."""
    kept: list[Path] = []
    hidden: list[Path] = []
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        relative_parts = path.relative_to(folder).parts
        (hidden if any(p.startswith((".", "_")) for p in relative_parts) else kept).append(path)
    return kept, hidden


def _same_folder(a: Path, b: Path) -> bool:
    """a and b (both resolved) name one folder: equal paths, or one inode (case-insensitive file
    systems, bind mounts) when both exist."""
    if a == b:
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def folder_relation(source: Path, output: Path) -> str | None:
    """How a resolved source folder overlaps a resolved output folder, if it does: "is the same
    folder as", "is inside" or "contains" (symlinks and bind mounts count as the same folder)."""
    if _same_folder(source, output):
        return "is the same folder as"
    if any(_same_folder(parent, output) for parent in source.parents):
        return "is inside"
    if any(_same_folder(parent, source) for parent in output.parents):
        return "contains"
    return None


def check_source_apart(source: Path, outputs: dict[str, str], key: str = "data.source") -> None:
    """Raise UserError if ``source`` is, contains or sits inside one of ``outputs``.

    ``outputs`` maps a params key (``data.raw_dir``, ``preprocess.cache_dir``, ...) to a folder the
    pipeline writes: data in such a folder is deleted or overwritten by a later run, so it cannot
    be a source. Paths are compared resolved (symlinks followed), so a link into raw_dir counts.
    """
    real_source = Path(source).expanduser().resolve()
    for output_key, folder in outputs.items():
        if not folder:  # an unset output folder overlaps nothing ("" would resolve to the cwd)
            continue
        relation = folder_relation(real_source, Path(folder).expanduser().resolve())
        if relation is None:
            continue
        writer = "which ingest rebuilds" if output_key.startswith(RAW_DIR_KEY) else "which the pipeline writes"
        raise UserError(
            f"{key} ({source}) {relation} {output_key} ({folder}), {writer}: "
            f"point {key} at a folder outside the pipeline's outputs"
        )


def _remove(path: Path) -> None:
    """Delete a file, link or folder tree if present (a link itself, never what it points to)."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def _swap_in(new: Path, target: Path) -> None:
    """Replace folder ``target`` by ``new`` with renames, so target is never half deleted: the old
    tree is moved aside first and deleted only once the new one stands in its place."""
    old = target.with_name(target.name + OLD_SUFFIX)
    _remove(old)  # left by an interrupted earlier run
    if target.exists():
        target.rename(old)
    try:
        new.rename(target)
    except BaseException:
        if old.exists() and not target.exists():
            old.rename(target)
        raise
    shutil.rmtree(old, ignore_errors=True)  # a leftover is removed by the next run


ADDED = "added"  # raw_dir/<label>/added/<batch>/...: the files of data.added_dir's batches


def added_batches(added_dir: Path | None) -> list[Path]:
    """The batch folders of data.added_dir in name order (files beside them, e.g. its README, and
    '_'/'.' folders are not batches); none when the folder is unset or absent."""
    if added_dir is None or not added_dir.is_dir():
        return []
    return [d for d in sorted(added_dir.iterdir()) if d.is_dir() and not _is_hidden(d)]


def _plan_label(plan: dict[str, list[tuple[Path, Path]]], label: str, folders: list[Path], under: Path) -> list[str]:
    """Add the files of one label's class folders to ``plan`` (source -> path under raw_dir/label),
    below ``under``; returns the hidden files left out."""
    skipped = []
    merged = len(folders) > 1
    for folder in folders:
        kept, hidden = _class_files(folder)
        if not kept:
            raise UserError(f"class folder is empty: {folder} (class '{label}')")
        skipped += [str(p) for p in hidden]
        # Merged folders keep their name as a sub-folder so equal file names cannot collide.
        prefix = under / folder.name if merged else under
        plan.setdefault(label, []).extend((p, prefix / p.relative_to(folder)) for p in kept)
    return skipped


def _refuse_collisions(plan: dict[str, list[tuple[Path, Path]]]) -> None:
    """Two files meant for one raw path (a source class folder with its own 'added/<batch>'): say
    which, rather than let one overwrite the other."""
    for label, pairs in plan.items():
        seen: dict[Path, Path] = {}
        for src, rel in pairs:
            if rel in seen:
                raise UserError(f"{src} and {seen[rel]} would both be ingested as {label}/{rel.as_posix()}; "
                                "rename one of them")
            seen[rel] = src


def _copy_into(work: Path, plan: dict[str, list[tuple[Path, Path]]], metadata: list[Path]) -> None:
    for label, pairs in plan.items():
        for src, rel in pairs:
            dest = work / label / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dest)
    for meta in metadata:
        (work / "_meta").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(meta, work / "_meta" / meta.name)


def _metadata_files(source: Path, class_root: Path) -> list[Path]:
    """Dataset-level metadata (e.g. kidneyData.csv) in the wrapper folders, kept beside the classes.

    Walked in a fixed order (source first): the report is a DVC dependency of `validate`, so it
    must not change between identical runs (a set of paths iterates in hash order).
    """
    wrappers = [class_root, *class_root.parents]
    found = []
    for folder in reversed(wrappers[:wrappers.index(source) + 1]):
        for meta in sorted(folder.glob("*")):
            if meta.is_file() and meta.suffix.lower() in METADATA_SUFFIXES:
                found.append(meta)
    return found


def ingest(cfg: DataConfig, output_dirs: dict[str, str] | None = None) -> IngestReport:
    """Copy the source data set into ``cfg.raw_dir/<label>/...``; return what was done.

    ``output_dirs`` ({params key: folder}) names further pipeline output folders the source must
    stay apart from; ``data.raw_dir`` is always checked.
    """
    source = Path(cfg.source).expanduser()
    raw_dir = Path(cfg.raw_dir)
    # Work on the real folder: if raw_dir is a link, the link stays and its target is rebuilt.
    real_raw = raw_dir.expanduser().resolve()
    work = real_raw.with_name(real_raw.name + WORK_SUFFIX)
    added_dir = Path(cfg.added_dir).expanduser() if cfg.added_dir else None
    if added_dir is not None:
        check_source_apart(added_dir, {**(output_dirs or {}), RAW_DIR_KEY: cfg.raw_dir}, key="data.added_dir")
    check_source_apart(source, {
        **(output_dirs or {}),
        RAW_DIR_KEY: cfg.raw_dir,
        f"{RAW_DIR_KEY}'s work folder": str(work),
        f"{RAW_DIR_KEY}'s previous copy": str(real_raw.with_name(real_raw.name + OLD_SUFFIX)),
    })
    if not source.exists():
        raise UserError(f"data.source: folder not found: {source}")
    if not source.is_dir():
        raise UserError(f"data.source must be a folder of class folders, got a file: {source}")
    class_root = find_class_root(source, cfg.image_extensions)
    by_label, excluded = resolve_class_folders(class_root, cfg.class_map)

    plan: dict[str, list[tuple[Path, Path]]] = {}
    report = IngestReport(source=str(source), class_root=str(class_root), excluded_folders=excluded)
    for label, folders in sorted(by_label.items()):
        report.skipped_hidden_files += _plan_label(plan, label, folders, Path())
        report.folders_per_label[label] = [str(f) for f in folders]
    for batch in added_batches(added_dir):
        # The batch folder itself holds the class folders (one class alone is no wrapper folder).
        batch_labels, _ = resolve_class_folders(batch, cfg.class_map, partial=True)
        unknown = sorted(set(batch_labels) - set(by_label))
        if unknown:  # a typo in a folder name must not become a new class
            raise UserError(f"added batch {batch} has class(es) {unknown} that data.source does not have "
                            f"(classes: {sorted(by_label)})")
        counts = {label: len(plan.get(label, [])) for label in batch_labels}
        for label, folders in sorted(batch_labels.items()):
            report.skipped_hidden_files += _plan_label(plan, label, folders, Path(ADDED) / batch.name)
        report.added_batches[batch.name] = {label: len(plan[label]) - counts[label] for label in sorted(batch_labels)}
    report.files_per_label = {label: len(pairs) for label, pairs in sorted(plan.items())}
    _refuse_collisions(plan)
    metadata = _metadata_files(source, class_root)
    report.metadata_files = [str(m) for m in metadata]

    # Rebuilt whole (so removed source files vanish), but in a work folder first: a failure
    # mid-copy leaves the previous raw_dir as it was and removes only the work folder.
    _remove(work)  # left by an interrupted earlier run
    work.mkdir(parents=True)
    try:
        _copy_into(work, plan, metadata)
    except BaseException as err:
        shutil.rmtree(work, ignore_errors=True)
        if isinstance(err, OSError):  # unreadable source file, full disk, ...: say which, one line
            raise UserError(
                f"ingest failed copying into {raw_dir} ({type(err).__name__}: {err}); "
                f"{raw_dir} was left as it was"
            ) from err
        raise
    _swap_in(work, real_raw)
    return report


def _tree_digest(folder: Path) -> str:
    """SHA-256 over the relative paths and bytes of every file under ``folder`` (sorted)."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def batch_folder(folder: Path, added_dir: Path) -> Path:
    """Where ``folder`` goes as an added batch: ``added_dir/<its name>-<content digest>``."""
    return added_dir / f"{folder.expanduser().resolve().name}-{_tree_digest(folder.expanduser())[:10]}"


def add_batch(folder: Path, added_dir: Path) -> Path:
    """Copy a labelled class-per-folder ``folder`` into ``added_dir/<name>-<content digest>`` (the
    same content twice is one batch); returns the batch folder. Its class folders are checked
    first, so a folder without any is one error and nothing is copied."""
    folder = folder.expanduser()
    if not folder.is_dir():
        raise UserError(f"labelled batch not found: {folder} (a folder of class folders)")
    resolve_class_folders(folder, {})  # raises on a folder without class folders
    batch = batch_folder(folder, added_dir)
    if batch.is_dir():
        return batch
    work = batch.with_name(f".{batch.name}{WORK_SUFFIX}")  # hidden: never read as a batch
    _remove(work)
    shutil.copytree(folder, work, ignore=shutil.ignore_patterns(".*"))
    work.rename(batch)
    return batch
