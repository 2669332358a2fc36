"""Build the manifest: one row per file in the raw folder, readable or not.

Unreadable files stay in the manifest with ``readable=False`` and a reason, and are listed in the
quarantine report; later stages use only readable rows, so every file is accounted for.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd

from tumorscope.config import WindowConfig
from tumorscope.data.images import (
    UnreadableImage,
    check_file_size,
    decode_greyscale,
    error_reason,
)
from tumorscope.errors import UserError

MANIFEST_COLUMNS = [
    "path", "label", "sha256", "phash", "width", "height", "mode",
    "mean", "std", "min", "max", "readable", "error",
]


def phash_hex(pixels: np.ndarray) -> str:
    """64-bit DCT perceptual hash (imagehash.phash) as 16 hex digits."""
    import imagehash
    from PIL import Image

    return str(imagehash.phash(Image.fromarray(pixels)))


def _sha256_of_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hash a file in chunks: used for files too large to read into memory."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _quarantined(row: dict, reason: str) -> dict:
    return row | {"phash": "", "width": 0, "height": 0, "mode": "", "mean": np.nan, "std": np.nan,
                  "min": np.nan, "max": np.nan, "readable": False, "error": reason}


def describe_file(path: Path, label: str, window: WindowConfig) -> dict:
    """One manifest row for one file. Never raises for a bad file: whatever goes wrong reading or
    decoding it (a bomb, a truncation, a decoder bug, a vanished or locked file) becomes a
    quarantined row with the reason, so one hostile file cannot stop the whole manifest."""
    row = {"path": path.as_posix(), "label": label, "sha256": ""}
    try:
        try:
            check_file_size(path.stat().st_size)
        except UnreadableImage as err:  # hashed in chunks, never read whole into memory
            return _quarantined(row | {"sha256": _sha256_of_file(path)}, error_reason(err))
        data = path.read_bytes()
    except OSError as err:  # no bytes, so no sha256 either: the reason says why
        return _quarantined(row, f"cannot read file ({error_reason(err)})")
    row["sha256"] = hashlib.sha256(data).hexdigest()
    try:
        pixels, mode = decode_greyscale(data, path.suffix, window)
    except ImportError:
        raise  # a missing decoder package is the environment's fault, not this file's
    except Exception as err:  # any decoder failure quarantines this one file, and only it
        return _quarantined(row, error_reason(err))
    return row | {
        "phash": phash_hex(pixels), "width": int(pixels.shape[1]), "height": int(pixels.shape[0]),
        "mode": mode, "mean": float(pixels.mean()), "std": float(pixels.std()),
        "min": float(pixels.min()), "max": float(pixels.max()), "readable": True, "error": "",
    }


def list_raw_files(raw_dir: Path) -> list[tuple[Path, str]]:
    """(file, label) for every file under raw_dir/<label>/, skipping '_'/'.' side folders."""
    if not raw_dir.is_dir():
        raise UserError(f"raw data folder not found: {raw_dir} (run the ingest stage first)")
    pairs = []
    for label_dir in sorted(d for d in raw_dir.iterdir() if d.is_dir() and not d.name.startswith(("_", "."))):
        for path in sorted(label_dir.rglob("*")):
            if path.is_file():
                pairs.append((path, label_dir.name))
    if not pairs:
        raise UserError(f"no files under {raw_dir}")
    return pairs


def build_manifest(raw_dir: Path, window: WindowConfig) -> pd.DataFrame:
    from tumorscope.progress import progress

    files = list_raw_files(raw_dir)
    rows = [describe_file(path, label, window) for path, label in progress(files, len(files), "manifest")]
    return pd.DataFrame(rows, columns=MANIFEST_COLUMNS)


def check_every_class_readable(manifest: pd.DataFrame) -> None:
    """A class whose files are all unreadable cannot be trained on: say which and where."""
    readable_per_label = manifest.groupby("label")["readable"].sum()
    for label, readable in readable_per_label.items():
        if readable == 0:
            total = int((manifest["label"] == label).sum())
            folder = Path(manifest.loc[manifest["label"] == label, "path"].iloc[0]).parent
            raise UserError(
                f"class '{label}' has no readable image: all {total} file(s) in {folder} are "
                "quarantined (see the quarantine report)"
            )


def quarantine_table(manifest: pd.DataFrame) -> pd.DataFrame:
    return manifest.loc[~manifest["readable"], ["path", "label", "sha256", "error"]]


def load_manifest(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"manifest not found: {path} (run the manifest stage first)")
    frame = pd.read_csv(path, keep_default_na=False, na_values={"mean": [""], "std": [""], "min": [""], "max": [""]},
                        dtype={"phash": str, "sha256": str, "error": str, "mode": str, "label": str})
    frame["readable"] = frame["readable"].astype(str).str.lower().eq("true")
    return frame
