"""The synthetic kidney-CT phantom: determinism, counts, layout, and the physics of its lesions."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from helpers.params import defaults, section
from tumorscope.config import CANONICAL_CLASSES, PhantomConfig, WindowConfig
from tumorscope.data.phantom import (
    MASK_DIR,
    class_counts,
    generate_phantom,
    image_rng,
    render_slice,
    render_slice_hu,
    window_hu,
)
from tumorscope.errors import UserError

N_PER_CLASS = 12  # physics checks: slices rendered per class


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def slices_hu() -> dict[str, list]:
    """A dozen HU slices per class at 64 px with the default noise and blur."""
    return {
        label: [render_slice_hu(image_rng(7, label, k), label, 64, 12.0, 0.7) for k in range(1, N_PER_CLASS + 1)]
        for label in CANONICAL_CLASSES
    }


# ----------------------------------------------------------------------------- class_counts


@pytest.mark.parametrize("n", [8, 12, 100, 1200, 1201])
def test_class_counts_sum_and_floor(n: int) -> None:
    counts = class_counts(n, defaults().phantom.proportions)
    assert sum(counts.values()) == n
    assert set(counts) == set(CANONICAL_CLASSES)
    assert min(counts.values()) >= 1


def test_class_counts_follow_proportions() -> None:
    counts = class_counts(1200, defaults().phantom.proportions)
    total = sum(defaults().phantom.proportions.values())
    for label, weight in defaults().phantom.proportions.items():
        assert abs(counts[label] - 1200 * weight / total) < 1.0
    assert class_counts(10, {"Cyst": 1, "Tumor": 1}) == {"Cyst": 5, "Tumor": 5}
    assert class_counts(7, {"Cyst": 1, "Tumor": 1}) in ({"Cyst": 4, "Tumor": 3}, {"Cyst": 3, "Tumor": 4})


def test_class_counts_rare_class_still_gets_one() -> None:
    counts = class_counts(10, {"Normal": 1000, "Stone": 1})
    assert counts == {"Normal": 9, "Stone": 1}


# ----------------------------------------------------------------------------- windowing


def test_window_hu_maps_level_and_clips() -> None:
    w = section(WindowConfig, level=40, width=400)
    out = window_hu(np.array([-1000.0, -160.0, 40.0, 240.0, 3000.0]), w)
    assert out.dtype == np.uint8
    assert out.tolist() == [0, 0, 128, 255, 255]


# ----------------------------------------------------------------------------- render_slice


def test_render_slice_is_deterministic_per_generator() -> None:
    a = render_slice(image_rng(3, "Tumor", 5), "Tumor", 64, 12.0, 0.7, section(WindowConfig))
    b = render_slice(image_rng(3, "Tumor", 5), "Tumor", 64, 12.0, 0.7, section(WindowConfig))
    c = render_slice(image_rng(4, "Tumor", 5), "Tumor", 64, 12.0, 0.7, section(WindowConfig))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
    assert not np.array_equal(a[0], c[0])
    image, mask, bbox = a
    assert image.shape == mask.shape == (64, 64)
    assert image.dtype == np.uint8 and mask.dtype == bool
    assert bbox is not None


def test_render_slice_rejects_unknown_class() -> None:
    with pytest.raises(ValueError, match="unknown phantom class"):
        render_slice(np.random.default_rng(0), "Polyp", 64, 12.0, 0.7, section(WindowConfig))


def test_normal_has_no_lesion(slices_hu) -> None:
    for s in slices_hu["Normal"]:
        assert not s.mask.any()
        assert s.bbox is None
        assert s.lesion_mean_hu is None


@pytest.mark.parametrize("label", ["Cyst", "Stone", "Tumor"])
def test_lesion_inside_body_and_bbox_matches_mask(slices_hu, label: str) -> None:
    for s in slices_hu[label]:
        assert s.mask.any()
        assert not (s.mask & ~s.body).any(), "lesion outside the body"
        x0, y0, x1, y1 = s.bbox
        rows, cols = np.nonzero(s.mask)
        assert (x0, y0, x1, y1) == (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
        inside = np.zeros_like(s.mask)
        inside[y0:y1, x0:x1] = True
        assert not (s.mask & ~inside).any()


def test_anatomy_in_hounsfield_units(slices_hu) -> None:
    for s in slices_hu["Normal"]:
        assert s.clean_hu[0, 0] == pytest.approx(-1000.0)  # air in the corner
        assert s.clean_hu.max() >= 500  # bone
        body = s.clean_hu[s.body]
        assert (body < -50).mean() > 0.1  # fat
        assert ((body > 20) & (body < 80)).mean() > 0.1  # soft tissue


def test_cyst_is_water_density(slices_hu) -> None:
    for s in slices_hu["Cyst"]:
        measured = float(s.hu[s.mask].mean())
        # True density 0-20 HU; the acquired mean moves a little with noise and edge blur.
        assert 0.0 <= s.lesion_mean_hu <= 20.0
        assert -30.0 <= measured <= 50.0


def test_stone_is_dense_and_survives_64px(slices_hu) -> None:
    for s in slices_hu["Stone"]:
        assert s.lesion_mean_hu > 400.0
        assert s.hu[s.mask].max() > 300.0  # still dense after blur and noise
        assert s.mask.sum() >= 5  # radius >= ~1.5 px at 64 px


def test_tumour_is_enhancing_and_heterogeneous(slices_hu) -> None:
    tumour_std = [float(s.clean_hu[s.mask].std()) for s in slices_hu["Tumor"]]
    cyst_std = [float(s.clean_hu[s.mask].std()) for s in slices_hu["Cyst"]]
    assert min(tumour_std) > max(cyst_std)  # cysts are uniform, tumours textured
    for s in slices_hu["Tumor"]:
        assert 30.0 <= s.lesion_mean_hu <= 130.0
    # Tumours are larger than cysts, which are larger than stones (on average).
    area = {label: np.mean([s.mask.sum() for s in slices_hu[label]]) for label in ("Cyst", "Stone", "Tumor")}
    assert area["Tumor"] > area["Cyst"] > area["Stone"]


def test_slices_are_not_perceptual_near_duplicates() -> None:
    """The split groups slices whose 64-bit pHash differ by <= 4 bits: phantom slices must vary
    enough (body size, position, rotation, organs) not to collapse into a few giant groups."""
    import imagehash  # a dependency of the project: missing is a failure, not a skip
    hashes = np.array(
        [
            imagehash.phash(Image.fromarray(
                render_slice(image_rng(0, label, k), label, 128, 12.0, 0.7, section(WindowConfig))[0])).hash.ravel()
            for label in CANONICAL_CLASSES
            for k in range(1, 31)
        ]
    )
    distance = (hashes[:, None, :] != hashes[None, :, :]).sum(-1)
    close_pairs = int((distance[np.triu_indices(len(hashes), 1)] <= 4).sum())
    assert close_pairs <= 8, f"{close_pairs} of 7140 pairs within pHash distance 4"


# ----------------------------------------------------------------------------- generate_phantom


def _tiny(tmp_path: Path, name: str = "ph") -> PhantomConfig:
    return section(PhantomConfig, out_dir=str(tmp_path / name), n_images=12, image_size=64)


def test_generate_layout_and_index(tmp_path: Path) -> None:
    cfg = _tiny(tmp_path)
    index = generate_phantom(cfg, seed=1)
    root = Path(cfg.out_dir)
    assert len(index) == 12
    assert list(index.columns) == [
        "image_id", "path", "diag", "target", "Class", "mask_path", "x0", "y0", "x1", "y1", "lesion_mean_hu"
    ]
    counts = class_counts(12, cfg.proportions)
    assert index["Class"].value_counts().to_dict() == counts
    assert sorted(p.name for p in root.iterdir()) == sorted([*counts, MASK_DIR, "kidneyData.csv"])
    for label, n in counts.items():
        names = sorted(p.name for p in (root / label).iterdir())
        assert names == sorted(f"{label}- ({k}).png" for k in range(1, n + 1))
    on_disk = pd.read_csv(root / "kidneyData.csv")
    assert len(on_disk) == 12
    for row in on_disk.itertuples():
        assert row.diag == row.Class
        assert row.target == CANONICAL_CLASSES.index(row.Class)
        assert row.path == f"{row.Class}/{row.image_id}.png"
        image = Image.open(root / row.path)
        mask = np.asarray(Image.open(root / row.mask_path))
        assert image.mode == "L" and image.size == (64, 64)
        assert row.mask_path.startswith(f"{MASK_DIR}/{row.Class}/")
        assert set(np.unique(mask)) <= {0, 255}
        if row.Class == "Normal":
            assert not mask.any()
            assert pd.isna(row.x0) and pd.isna(row.lesion_mean_hu)
        else:
            rows, cols = np.nonzero(mask)
            assert (row.x0, row.y0, row.x1, row.y1) == (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
            assert not pd.isna(row.lesion_mean_hu)


def test_generate_is_deterministic_and_seed_dependent(tmp_path: Path) -> None:
    a = generate_phantom(_tiny(tmp_path, "a"), seed=5)
    b = generate_phantom(_tiny(tmp_path, "b"), seed=5)
    c = generate_phantom(_tiny(tmp_path, "c"), seed=6)
    da, db, dc = (_digest(tmp_path / n) for n in "abc")
    assert da == db
    assert a.equals(b)
    images = [k for k in da if not k.startswith(MASK_DIR) and k.endswith(".png")]
    assert all(da[k] != dc[k] for k in images)
    assert not a.equals(c)


def test_images_do_not_depend_on_other_classes_counts(tmp_path: Path) -> None:
    generate_phantom(section(PhantomConfig, out_dir=str(tmp_path / "a"), n_images=12, image_size=64), seed=2)
    generate_phantom(
        section(PhantomConfig, out_dir=str(tmp_path / "b"), n_images=12, image_size=64, proportions={"Cyst": 1, "Tumor": 3}),
        seed=2,
    )
    same = "Cyst/Cyst- (1).png"
    assert (tmp_path / "a" / same).read_bytes() == (tmp_path / "b" / same).read_bytes()


def test_generate_replaces_previous_output(tmp_path: Path) -> None:
    cfg = _tiny(tmp_path)
    generate_phantom(cfg, seed=1)
    stale = Path(cfg.out_dir) / "Normal" / "Normal- (999).png"
    stale.write_bytes(b"old")
    generate_phantom(cfg, seed=1)
    assert not stale.exists()


def test_generate_refuses_to_wipe_a_foreign_folder(tmp_path: Path) -> None:
    cfg = _tiny(tmp_path)
    Path(cfg.out_dir).mkdir()
    precious = Path(cfg.out_dir) / "thesis.tex"
    precious.write_text("do not delete")
    with pytest.raises(UserError, match="refusing"):
        generate_phantom(cfg, seed=1)
    assert precious.read_text() == "do not delete"
