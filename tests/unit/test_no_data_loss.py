"""Ingest never destroys source data: a source overlapping a pipeline output is refused before
anything is touched, and a failed copy leaves the previous raw folder as it was."""

import hashlib
import shutil
from pathlib import Path

import pytest

from helpers.params import section
from tumorscope.config import DataConfig
from tumorscope.data.ingest import check_source_apart, ingest
from tumorscope.errors import UserError


def _hashes(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under root (symlinks followed, as ingest would)."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _into_raw(class_folders: Path, raw: Path) -> Path:
    """Move the data set inside raw: the user's images now live in the pipeline's output."""
    raw.mkdir(parents=True, exist_ok=True)
    return Path(shutil.move(str(class_folders), str(raw / "dataset")))


def _source_is_raw(tmp_path, class_folders):
    return class_folders, class_folders, {}


def _source_inside_raw(tmp_path, class_folders):
    raw = tmp_path / "raw"
    return _into_raw(class_folders, raw), raw, {}


def _raw_inside_source(tmp_path, class_folders):
    return class_folders, class_folders / "raw", {}


def _symlink_into_raw(tmp_path, class_folders):
    raw = tmp_path / "raw"
    target = _into_raw(class_folders, raw)
    link = tmp_path / "link-to-data"
    link.symlink_to(target, target_is_directory=True)
    return link, raw, {}


def _inside_other_output(tmp_path, class_folders):
    cache = tmp_path / "cache"
    source = _into_raw(class_folders, cache)
    return source, tmp_path / "raw", {"preprocess.cache_dir": str(cache)}


@pytest.mark.parametrize(
    ("setup", "key", "relation"),
    [
        (_source_is_raw, "data.raw_dir", "is the same folder as"),
        (_source_inside_raw, "data.raw_dir", "is inside"),
        (_raw_inside_source, "data.raw_dir", "contains"),
        (_symlink_into_raw, "data.raw_dir", "is inside"),
        (_inside_other_output, "preprocess.cache_dir", "is inside"),
    ],
)
def test_overlapping_source_is_refused_and_untouched(tmp_path, class_folders, setup, key, relation):
    source, raw, output_dirs = setup(tmp_path, class_folders)
    watched = source.resolve()
    before = _hashes(watched)
    assert len(before) == 36
    with pytest.raises(UserError) as err:
        ingest(section(DataConfig, source=str(source), raw_dir=str(raw)), output_dirs=output_dirs)
    message = str(err.value)
    assert "data.source" in message and key in message and relation in message
    assert str(source) in message and "\n" not in message
    assert _hashes(watched) == before  # every source file still there, byte for byte
    assert not list(tmp_path.glob("*.tmp-ingest"))  # nothing was copied either


def test_check_source_apart_is_quiet_for_separate_folders(tmp_path):
    check_source_apart(tmp_path / "data" / "phantom", {
        "data.raw_dir": str(tmp_path / "data" / "raw"), "preprocess.cache_dir": str(tmp_path / "data" / "cache"),
        "unset.dir": "",  # an unset folder must not count as the working directory
    })


def test_sibling_with_a_common_prefix_is_not_inside(tmp_path):
    # "data/raw-source" starts with the text "data/raw" but is not inside it.
    check_source_apart(tmp_path / "raw-source", {"data.raw_dir": str(tmp_path / "raw")})


def test_rerun_replaces_the_previous_copy(tmp_path, class_folders):
    cfg = section(DataConfig, source=str(class_folders), raw_dir=str(tmp_path / "raw"))
    ingest(cfg)
    (class_folders / "Cyst" / "Cyst- (0).png").unlink()
    report = ingest(cfg)
    assert report.files_per_label["Cyst"] == 11
    assert not (tmp_path / "raw" / "Cyst" / "Cyst- (0).png").exists()  # removed sources vanish
    assert len(list((tmp_path / "raw" / "Cyst").iterdir())) == 11
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset", "raw"]  # no work folders left


def test_failed_copy_keeps_the_previous_copy(tmp_path, class_folders, monkeypatch):
    cfg = section(DataConfig, source=str(class_folders), raw_dir=str(tmp_path / "raw"))
    ingest(cfg)
    before = _hashes(tmp_path / "raw")
    (class_folders / "Normal" / "Normal- (0).png").unlink()  # a change that must not half-apply
    real_copyfile = shutil.copyfile
    calls = {"n": 0}

    def failing_copyfile(src, dst, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, "No space left on device")
        return real_copyfile(src, dst, *args, **kwargs)

    monkeypatch.setattr(shutil, "copyfile", failing_copyfile)
    with pytest.raises(UserError, match="No space left on device") as err:
        ingest(cfg)
    assert "left as it was" in str(err.value)
    assert _hashes(tmp_path / "raw") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset", "raw"]


def test_raw_dir_link_is_kept_and_its_target_rebuilt(tmp_path, class_folders):
    target = tmp_path / "disk" / "raw"
    target.mkdir(parents=True)
    (target / "stale.txt").write_text("from an old run")
    link = tmp_path / "raw"
    link.symlink_to(target, target_is_directory=True)
    ingest(section(DataConfig, source=str(class_folders), raw_dir=str(link)))
    assert link.is_symlink() and not (target / "stale.txt").exists()
    assert len(list((link / "Tumor").iterdir())) == 12
