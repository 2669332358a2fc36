"""Ingest a class-per-folder image set (or the phantom's output) into the immutable raw folder.

Accepts the public Kaggle "CT KIDNEY DATASET: Normal-Cyst-Tumor-Stone" as downloaded (a wrapper
folder of the same name around the class folders, plus ``kidneyData.csv``), or any folder whose
sub-folders are classes. Every file inside a class folder is copied, images or not: deciding what
is readable is the manifest's job, so nothing is dropped here without a trace.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tumorscope.config import DataConfig
from tumorscope.errors import UserError

METADATA_SUFFIXES = {".csv", ".txt", ".md", ".json"}


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


def resolve_class_folders(class_root: Path, class_map: dict[str, str | None]) -> tuple[dict[str, list[Path]], list[str]]:
    """Return ({label: [class folders]}, excluded folder names) after applying the class map."""
    folders = {d.name: d for d in sorted(class_root.iterdir()) if d.is_dir() and not _is_hidden(d)}
    if not folders:
        raise UserError(f"no class folders found in {class_root} (expected one sub-folder per class)")
    if not class_map:
        return {name: [path] for name, path in folders.items()}, []
    unknown = sorted(set(class_map) - set(folders))
    if unknown:
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
    kept, hidden = [], []
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        relative_parts = path.relative_to(folder).parts
        (hidden if any(p.startswith((".", "_")) for p in relative_parts) else kept).append(path)
    return kept, hidden


def ingest(cfg: DataConfig) -> IngestReport:
    """Copy the source data set into ``cfg.raw_dir/<label>/...``; return what was done."""
    source = Path(cfg.source).expanduser()
    if not source.exists():
        raise UserError(f"data.source: folder not found: {source}")
    if not source.is_dir():
        raise UserError(f"data.source must be a folder of class folders, got a file: {source}")
    class_root = find_class_root(source, cfg.image_extensions)
    by_label, excluded = resolve_class_folders(class_root, cfg.class_map)

    plan: dict[str, list[tuple[Path, Path]]] = {}
    report = IngestReport(source=str(source), class_root=str(class_root), excluded_folders=excluded)
    for label, folders in sorted(by_label.items()):
        merged = len(folders) > 1
        for folder in folders:
            kept, hidden = _class_files(folder)
            if not kept:
                raise UserError(f"class folder is empty: {folder} (class '{label}')")
            report.skipped_hidden_files += [str(p) for p in hidden]
            # Merged folders keep their name as a sub-folder so equal file names cannot collide.
            prefix = Path(folder.name) if merged else Path()
            plan.setdefault(label, []).extend((p, prefix / p.relative_to(folder)) for p in kept)
        report.files_per_label[label] = len(plan[label])
        report.folders_per_label[label] = [str(f) for f in folders]

    raw_dir = Path(cfg.raw_dir)
    if raw_dir.exists():
        shutil.rmtree(raw_dir)  # a generated copy: rebuilt whole so removed source files vanish
    for label, pairs in plan.items():
        for src, rel in pairs:
            dest = raw_dir / label / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dest)
    # Dataset-level metadata (e.g. kidneyData.csv) sits in the wrapper folders: keep it beside.
    # Walked in a fixed order (source first): the report is a DVC dependency of `validate`, so
    # it must not change between identical runs (a set of paths iterates in hash order).
    wrappers = [class_root, *class_root.parents]
    for folder in reversed(wrappers[:wrappers.index(source) + 1]):
        for meta in sorted(folder.glob("*")):
            if meta.is_file() and meta.suffix.lower() in METADATA_SUFFIXES:
                (raw_dir / "_meta").mkdir(parents=True, exist_ok=True)
                shutil.copyfile(meta, raw_dir / "_meta" / meta.name)
                report.metadata_files.append(str(meta))
    return report
