from pathlib import Path

import numpy as np
import pytest

from helpers.images import textured_slice, write_png
from helpers.params import section
from tumorscope.config import DataConfig, WindowConfig
from tumorscope.data.ingest import add_batch, find_class_root, ingest
from tumorscope.data.manifest import build_manifest, check_every_class_readable, quarantine_table
from tumorscope.errors import UserError


def _ingest(source: Path, tmp_path: Path, **kwargs):
    kwargs.setdefault("added_dir", str(tmp_path / "added"))
    return ingest(section(DataConfig, source=str(source), raw_dir=str(tmp_path / "raw"), **kwargs))


def test_kaggle_nested_layout_and_csv_are_found(tmp_path, class_folders):
    nested = tmp_path / "CT-KIDNEY-DATASET" / "CT-KIDNEY-DATASET"
    nested.parent.mkdir()
    class_folders.rename(nested)
    (tmp_path / "CT-KIDNEY-DATASET" / "kidneyData.csv").write_text("image_id,Class\n")
    report = _ingest(tmp_path / "CT-KIDNEY-DATASET", tmp_path)
    assert find_class_root(tmp_path / "CT-KIDNEY-DATASET", section(DataConfig).image_extensions) == nested
    assert report.files_per_label == {"Cyst": 12, "Normal": 12, "Tumor": 12}
    assert (tmp_path / "raw" / "_meta" / "kidneyData.csv").is_file()
    assert len(list((tmp_path / "raw" / "Tumor").iterdir())) == 12


def test_class_map_selects_and_merges(tmp_path, class_folders):
    report = _ingest(class_folders, tmp_path, class_map={"Tumor": "Abnormal", "Cyst": "Abnormal", "Normal": "Normal"})
    assert report.files_per_label == {"Abnormal": 24, "Normal": 12}
    # merged folders keep their names so equal file names cannot collide
    assert {p.name for p in (tmp_path / "raw" / "Abnormal").iterdir()} == {"Cyst", "Tumor"}
    report = _ingest(class_folders, tmp_path, class_map={"Tumor": "Tumor", "Normal": "Normal", "Cyst": None})
    assert report.excluded_folders == ["Cyst"] and set(report.files_per_label) == {"Normal", "Tumor"}


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda root: root / "missing", "folder not found"),
        (lambda root: (root / "Stone").mkdir() or root, "class folder is empty"),
    ],
)
def test_bad_sources_raise_one_line(tmp_path, class_folders, setup, message):
    with pytest.raises(UserError, match=message) as err:
        _ingest(setup(class_folders), tmp_path)
    assert "\n" not in str(err.value)


def test_unknown_class_in_class_map(tmp_path, class_folders):
    with pytest.raises(UserError, match=r"\['Melanoma'\]"):
        _ingest(class_folders, tmp_path, class_map={"Melanoma": "Tumor"})


def test_non_images_and_corrupt_files_are_quarantined_not_dropped(tmp_path, class_folders):
    (class_folders / "Cyst" / "notes.txt").write_text("scanner log")
    (class_folders / "Tumor" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    write_png(class_folders / "Normal" / "big.png", textured_slice(np.random.default_rng(5), size=100))
    _ingest(class_folders, tmp_path)
    manifest = build_manifest(tmp_path / "raw", section(WindowConfig))
    assert len(manifest) == 12 * 3 + 3
    quarantined = quarantine_table(manifest)
    assert sorted(Path(p).name for p in quarantined["path"]) == ["broken.jpg", "notes.txt"]
    assert quarantined["error"].str.len().gt(0).all()
    readable = manifest[manifest["readable"]]
    assert set(readable["width"]) == {48, 100}  # mixed sizes are kept, not rejected
    assert readable["phash"].str.fullmatch(r"[0-9a-f]{16}").all()
    assert readable["sha256"].str.fullmatch(r"[0-9a-f]{64}").all()
    check_every_class_readable(manifest)


def test_class_with_only_corrupt_files_is_an_error(tmp_path, class_folders):
    stone = class_folders / "Stone"
    stone.mkdir()
    for i in range(3):
        (stone / f"Stone- ({i}).jpg").write_bytes(b"garbage")
    _ingest(class_folders, tmp_path)
    manifest = build_manifest(tmp_path / "raw", section(WindowConfig))
    with pytest.raises(UserError, match="class 'Stone' has no readable image: all 3 file"):
        check_every_class_readable(manifest)


def _batch(root: Path, counts: dict[str, int], seed: int) -> Path:
    rng = np.random.default_rng(seed)
    for label, n in counts.items():
        for i in range(n):
            write_png(root / label / f"{label}- ({i}).png", textured_slice(rng))
    return root


def test_added_batches_are_ingested_beside_the_unchanged_source(tmp_path, class_folders):
    before = _ingest(class_folders, tmp_path)
    old_paths = sorted(p.relative_to(tmp_path / "raw") for p in (tmp_path / "raw").rglob("*.png"))
    batch = add_batch(_batch(tmp_path / "new" / "scanner-b", {"Tumor": 3, "Normal": 2}, 1), tmp_path / "added")
    assert batch.parent == tmp_path / "added" and batch.name.startswith("scanner-b-")
    report = _ingest(class_folders, tmp_path)
    assert report.added_batches == {batch.name: {"Normal": 2, "Tumor": 3}}
    assert report.files_per_label == {"Cyst": 12, "Normal": 14, "Tumor": 15}
    assert sum(report.files_per_label.values()) == sum(before.files_per_label.values()) + 5
    now = sorted(p.relative_to(tmp_path / "raw") for p in (tmp_path / "raw").rglob("*.png"))
    assert set(old_paths) <= set(now)  # old + new: every old file where it was
    assert sorted(p.parent for p in set(now) - set(old_paths)) == (
        [Path("Normal", "added", batch.name)] * 2 + [Path("Tumor", "added", batch.name)] * 3)


def test_the_same_batch_twice_is_one_batch_and_a_folder_without_classes_copies_nothing(tmp_path):
    folder = _batch(tmp_path / "incoming", {"Cyst": 2}, 2)
    first = add_batch(folder, tmp_path / "added")
    assert add_batch(folder, tmp_path / "added") == first
    write_png(folder / "Cyst" / "another.png", textured_slice(np.random.default_rng(9)))
    assert add_batch(folder, tmp_path / "added") != first  # new content: a new batch
    flat = tmp_path / "flat"
    write_png(flat / "slice.png", textured_slice(np.random.default_rng(3)))
    with pytest.raises(UserError, match="no class folders"):
        add_batch(flat, tmp_path / "added")
    with pytest.raises(UserError, match="labelled batch not found"):
        add_batch(tmp_path / "missing", tmp_path / "added")
    assert len(list((tmp_path / "added").iterdir())) == 2


def test_a_batch_with_an_unmapped_class_or_a_colliding_path_is_one_line(tmp_path, class_folders):
    _batch(tmp_path / "added" / "b1", {"Melanoma": 2}, 4)
    with pytest.raises(UserError, match=r"class folder\(s\) \['Melanoma'\] are not in data.class_map"):
        _ingest(class_folders, tmp_path, class_map={"Tumor": "Tumor", "Normal": "Normal"})
    with pytest.raises(UserError, match=r"added batch .*b1 has class\(es\) \['Melanoma'\] that data.source does not have"):
        _ingest(class_folders, tmp_path)
    (tmp_path / "added" / "b1" / "Melanoma").rename(tmp_path / "added" / "b1" / "Tumor")
    write_png(class_folders / "Tumor" / "added" / "b1" / "Melanoma- (0).png", textured_slice(np.random.default_rng(5)))
    with pytest.raises(UserError, match="would both be ingested as Tumor/added/b1/Melanoma- \\(0\\).png"):
        _ingest(class_folders, tmp_path)
