"""A deterministic synthetic kidney-CT phantom: the embedded default data set.

Each image is an axial abdominal slice through the kidneys, built in Hounsfield units (HU) on a
resolution-independent grid (coordinates in [-1, 1], x to the patient's left = image right, y
posterior = image down), blurred and given scanner-like noise in HU, then windowed to 8 bits
exactly as a DICOM slice would be (``WindowConfig``: level 40, width 400 -> [-160, 240] HU).

Anatomy: air, a CT table, an elliptical body with a subcutaneous fat rim and muscular wall,
visceral fat, liver, sometimes spleen and gallbladder, bowel loops (some with gas), aorta (with an
occasional wall calcification) and IVC, psoas and paraspinal muscles, a vertebra (cortical rim,
cancellous core, canal, posterior elements), ribs, and two bean-shaped enhancing kidneys (cortex,
medulla, renal sinus fat and pelvis) in perirenal fat either side of the spine; sometimes the arms.
Body size, aspect, position and a small rotation on the table vary per slice, enough that slices
are not perceptual-hash near-duplicates of one another (the split groups those).

Classes (``CANONICAL_CLASSES``), one lesion in one kidney except Normal:

- Normal: no lesion (confounders such as gallbladder, calcified aorta, ribs and gas still occur);
- Cyst: round, sharp-edged, water density (0-20 HU), often bulging out of the contour;
- Stone: a small, very dense focus (500-1200 HU; radius >= 2 px at 64 px), sometimes two;
- Tumor: an irregular (random-harmonic radius), heterogeneous, enhancing mass (about 40-120 HU
  with texture, sometimes a necrotic centre), larger, distorting the kidney contour.

Everything is deterministic given ``seed``: each image has its own generator derived from
(seed, class, index), so an image does not depend on generation order or on the other classes'
counts. ``generate_phantom`` writes the public Kaggle data set's layout
(``<Class>/<Class>- (<k>).png`` plus ``kidneyData.csv``); lesion masks go to ``_masks/<Class>/``,
a folder that class-per-folder readers skip because of its leading underscore.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from scipy import ndimage

from tumorscope.config import CANONICAL_CLASSES, PhantomBatchConfig, PhantomConfig, ScannerConfig, WindowConfig
from tumorscope.data.images import window_hu  # the same window DICOM slices go through
from tumorscope.errors import UserError

MASK_DIR = "_masks"
INDEX_FILE = "kidneyData.csv"
CSV_COLUMNS = ["image_id", "path", "diag", "target", "Class", "mask_path", "x0", "y0", "x1", "y1", "lesion_mean_hu"]

AIR_HU = -1000.0
# The smallest stone radius, in pixels of a 64 px image (radii scale with the image size).
MIN_STONE_RADIUS_PX_AT_64 = 2.0

BBox = tuple[int, int, int, int]


# ----------------------------------------------------------------------------- counts and windows


def class_counts(n_images: int, proportions: dict[str, float]) -> dict[str, int]:
    """Split ``n_images`` by ``proportions`` (largest remainder); every positive class gets >= 1.

    Keys come back in canonical order; classes with a proportion <= 0 are left out.
    """
    positive = {c: float(proportions[c]) for c in CANONICAL_CLASSES if proportions.get(c, 0) > 0}
    positive.update({c: float(v) for c, v in proportions.items() if c not in positive and v > 0})
    if not positive:
        raise ValueError("class_counts needs at least one positive proportion")
    if n_images < len(positive):
        raise ValueError(f"n_images={n_images} is fewer than the {len(positive)} classes to fill")
    total = sum(positive.values())
    exact = {c: n_images * v / total for c, v in positive.items()}
    counts = {c: max(1, math.floor(e)) for c, e in exact.items()}
    # Hand out (or take back) the difference by remainder; ties go in key order (stable sort).
    order = list(positive)
    while sum(counts.values()) < n_images:
        best = max(order, key=lambda c: (exact[c] - counts[c], -order.index(c)))
        counts[best] += 1
    while sum(counts.values()) > n_images:  # only when the ">= 1" floor over-allocated
        candidates = [c for c in order if counts[c] > 1]
        worst = min(candidates, key=lambda c: (exact[c] - counts[c], order.index(c)))
        counts[worst] -= 1
    return counts


# ----------------------------------------------------------------------------- geometry helpers


class _Grid:
    """Pixel-centre coordinates in [-1, 1] for a square image."""

    def __init__(self, size: int) -> None:
        c = (np.arange(size, dtype=np.float64) + 0.5) / size * 2.0 - 1.0
        self.size = size
        self.x = c[None, :]
        self.y = c[:, None]
        self.px = 2.0 / size  # one pixel in grid units

    def local(self, cx: float, cy: float, a: float, b: float, theta: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """Coordinates in an ellipse's frame, scaled so the ellipse is the unit circle."""
        dx, dy = self.x - cx, self.y - cy
        c, s = math.cos(theta), math.sin(theta)
        return (dx * c + dy * s) / a, (-dx * s + dy * c) / b

    def _window(self, cx: float, cy: float, reach: float) -> tuple[slice, slice]:
        """Rows and columns of the pixels within ``reach`` (grid units) of a centre, as slices."""
        n = self.size

        def span(c: float) -> slice:
            lo = max(0, math.floor((c - reach + 1.0) / self.px - 0.5))
            hi = min(n, math.ceil((c + reach + 1.0) / self.px + 0.5))
            return slice(lo, max(lo, hi))

        return span(cy), span(cx)

    def _shape(self, cx: float, cy: float, a: float, b: float, theta: float, reach: float, inside) -> np.ndarray:
        """Evaluate ``inside(u, v)`` (ellipse-frame coordinates) only near the centre; full-size mask out."""
        out = np.zeros((self.size, self.size), dtype=bool)
        rows, cols = self._window(cx, cy, reach)
        if rows.start >= rows.stop or cols.start >= cols.stop:
            return out
        dx, dy = self.x[:, cols] - cx, self.y[rows, :] - cy
        c, s = math.cos(theta), math.sin(theta)
        out[rows, cols] = inside((dx * c + dy * s) / a, (-dx * s + dy * c) / b)
        return out

    def ellipse(self, cx: float, cy: float, a: float, b: float, theta: float = 0.0, p: float = 2.0) -> np.ndarray:
        reach = math.hypot(a, b) + self.px
        if p == 2.0:
            return self._shape(cx, cy, a, b, theta, reach, lambda u, v: u * u + v * v <= 1.0)
        return self._shape(cx, cy, a, b, theta, reach, lambda u, v: np.abs(u) ** p + np.abs(v) ** p <= 1.0)

    def blob(self, cx: float, cy: float, a: float, b: float, theta: float, harmonics: list[tuple[int, float, float]]) -> np.ndarray:
        """An ellipse whose radius is modulated by ``1 + sum(amp * cos(k * phi + phase))``."""

        def inside(u: np.ndarray, v: np.ndarray) -> np.ndarray:
            phi = np.arctan2(v, u)
            radius = np.ones_like(u)
            for k, amp, phase in harmonics:
                radius += amp * np.cos(k * phi + phase)
            return np.hypot(u, v) <= radius

        reach = max(a, b) * (1.0 + sum(abs(h[1]) for h in harmonics)) + self.px
        return self._shape(cx, cy, a, b, theta, reach, inside)


def _harmonics(rng: np.random.Generator, k_max: int, amp: float) -> list[tuple[int, float, float]]:
    return [(k, amp * rng.uniform(0.3, 1.0) / k**0.5, rng.uniform(0, 2 * math.pi)) for k in range(2, k_max + 1)]


def _smooth_noise(rng: np.random.Generator, size: int, sigma_px: float) -> np.ndarray:
    """Gaussian-correlated noise with unit standard deviation."""
    field = ndimage.gaussian_filter(rng.standard_normal((size, size)), max(sigma_px, 0.3), mode="reflect")
    std = field.std()
    return field / std if std > 0 else field


def _low_frequency_noise(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth, unit-std noise varying over about a tenth of the image (cheap: upsampled 8x8)."""
    coarse = ndimage.gaussian_filter(rng.standard_normal((8, 8)), 0.8, mode="reflect")
    field = ndimage.zoom(coarse, size / 8, order=1, mode="nearest", grid_mode=True)[:size, :size]
    std = field.std()
    return field / std if std > 0 else field


def _bbox(mask: np.ndarray) -> BBox | None:
    """(x0, y0, x1, y1): inclusive start, exclusive end; None for an empty mask."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


# ----------------------------------------------------------------------------- anatomy


@dataclass(frozen=True)
class _Kidney:
    cx: float
    cy: float
    a: float  # semi-axis along the long axis
    b: float  # semi-axis along the short axis (towards the hilum)
    e1: tuple[float, float]  # long-axis unit vector
    e2: tuple[float, float]  # unit vector towards the hilum (antero-medial)

    def local(self, g: _Grid) -> tuple[np.ndarray, np.ndarray]:
        dx, dy = g.x - self.cx, g.y - self.cy
        return (dx * self.e1[0] + dy * self.e1[1]) / self.a, (dx * self.e2[0] + dy * self.e2[1]) / self.b

    def to_grid(self, u: float, v: float) -> tuple[float, float]:
        return (
            self.cx + u * self.a * self.e1[0] + v * self.b * self.e2[0],
            self.cy + u * self.a * self.e1[1] + v * self.b * self.e2[1],
        )


@dataclass
class _Scene:
    hu: np.ndarray
    body: np.ndarray  # body outline, table excluded
    cavity: np.ndarray  # inside the muscular wall: where organs lie
    allowed: np.ndarray  # where a lesion may lie: the cavity less bone and great vessels
    kidneys: list[_Kidney]
    kidney_masks: list[np.ndarray]
    sinus_masks: list[np.ndarray]
    scale: float  # anatomy size relative to a typical abdomen


def _anatomy(rng: np.random.Generator, g: _Grid) -> _Scene:
    size = g.size
    hu = np.full((size, size), AIR_HU)
    # Slow tissue inhomogeneity, shared by all soft tissue.
    drift = 4.0 * _low_frequency_noise(rng, size)
    # One fine texture field per image, shared by organs that never overlap (liver, bone, faeces).
    fine = _smooth_noise(rng, size, 0.8 * size / 128)

    # Body outline: a squarish ellipse with small lobulations.
    bcx = rng.uniform(-0.12, 0.12)
    bcy = rng.uniform(-0.2, 0.06)
    ba = rng.uniform(0.68, 1.0)
    bb = ba * rng.uniform(0.6, 0.82)
    bb = min(bb, 0.8 - bcy)
    body = g.blob(bcx, bcy, ba, bb, 0.0, _harmonics(rng, 4, 0.03)) & g.ellipse(bcx, bcy, ba * 1.05, bb * 1.05, p=rng.uniform(2.0, 2.6))

    if rng.random() < 0.25:  # arms down, beside the trunk (often cut by the field of view)
        for s in (-1, 1):
            acx, acy = bcx + s * (ba + rng.uniform(0.2, 0.26)), bcy + rng.uniform(-0.15, 0.2)
            arm = g.ellipse(acx, acy, 0.18, 0.22, rng.uniform(-0.4, 0.4)) & ~body
            hu[arm] = rng.uniform(-110, -80)
            hu[g.ellipse(acx, acy, 0.14, 0.18) & arm] = rng.uniform(40, 60)
            hu[g.ellipse(acx, acy, 0.045, 0.05) & arm] = rng.uniform(600, 900)

    fat_hu = rng.uniform(-115, -85)
    hu[body] = fat_hu + drift[body]
    fat = rng.uniform(0.04, 0.15)  # subcutaneous fat thickness
    wall = rng.uniform(0.025, 0.05)  # abdominal wall muscle thickness
    muscle_hu = rng.uniform(40, 60)
    inner = g.ellipse(bcx, bcy + 0.01, ba - fat, bb - 0.8 * fat, p=2.2) & body
    hu[inner] = muscle_hu + drift[inner]
    ca, cb = ba - fat - wall, bb - 0.8 * fat - wall
    cavity = g.ellipse(bcx, bcy + 0.01, ca, cb, p=2.2) & inner
    hu[cavity] = rng.uniform(-105, -80) + drift[cavity]

    # Spine position: the vertebral body sits about a third of the way from the back to the centre.
    scale = ca / 0.7
    vr = rng.uniform(0.095, 0.12) * scale
    sx = bcx + rng.normal(0.0, 0.012)
    sy = bcy + 0.01 + cb - rng.uniform(0.24, 0.30) * scale
    back = bcy + bb - 0.6 * fat

    # Paraspinal muscles and psoas (drawn before bone).
    for s in (-1, 1):
        para = g.ellipse(sx + s * 0.15 * scale, sy + vr + 0.11 * scale, 0.13 * scale, 0.11 * scale, s * 0.2) & body
        hu[para] = muscle_hu + rng.normal(0, 3) + drift[para]
        psoas = g.ellipse(sx + s * (vr + 0.04 * scale), sy - 0.01, 0.05 * scale, 0.065 * scale, s * 0.4) & cavity
        hu[psoas] = muscle_hu + rng.normal(0, 3) + drift[psoas]

    # Liver (patient's right = image left), its size depends on the slice level.
    level = rng.uniform(0.0, 1.0)
    if level > 0.15:
        la, lb = ca * rng.uniform(0.35, 0.55) * level**0.5, cb * rng.uniform(0.55, 0.8) * level**0.5
        liver = g.blob(bcx - ca + la * rng.uniform(0.8, 1.0), bcy - 0.05, la, lb, rng.uniform(-0.4, 0.2), _harmonics(rng, 4, 0.12)) & cavity
        liver_hu = rng.uniform(50, 70)
        hu[liver] = liver_hu + 1.5 * drift[liver] + 4.0 * fine[liver]
        if rng.random() < 0.3:  # gallbladder: a water-density oval in the liver (a cyst look-alike)
            gb = g.ellipse(bcx - ca + la * rng.uniform(1.0, 1.4), bcy - cb * rng.uniform(0.1, 0.4), 0.06 * scale,
                           0.045 * scale, rng.uniform(0, math.pi)) & cavity
            hu[gb] = rng.uniform(0, 20)
    if rng.random() < 0.5:  # spleen tip (patient's left, posterior)
        sp = g.blob(bcx + ca * 0.75, sy - 0.05, 0.12 * scale, 0.16 * scale, 0.5, _harmonics(rng, 3, 0.1)) & cavity
        hu[sp] = rng.uniform(40, 55) + drift[sp]

    # Bowel loops and colon: soft-tissue walls, fluid or faeces, sometimes gas.
    n_loops = int(rng.integers(6, 13))
    for _ in range(n_loops):
        if rng.random() < 0.25:  # colon, lateral
            cx = bcx + rng.choice([-1, 1]) * ca * rng.uniform(0.55, 0.8)
            cy = bcy + rng.uniform(-0.4, 0.1) * cb
        else:
            cx = bcx + rng.uniform(-0.6, 0.6) * ca
            cy = bcy + rng.uniform(-0.75, 0.05) * cb
        r = rng.uniform(0.04, 0.1) * scale
        ra, theta, shape = r * rng.uniform(1.0, 1.6), rng.uniform(0, math.pi), _harmonics(rng, 3, 0.15)
        outer = g.blob(cx, cy, ra, r, theta, shape) & cavity
        if not outer.any():
            continue
        hu[outer] = rng.uniform(25, 45)
        wall_t = max(0.012, g.px)
        lumen = g.blob(cx, cy, ra - wall_t, r - wall_t, theta, shape) & outer
        roll = rng.random()
        hu[lumen] = rng.uniform(-5, 35)  # fluid
        if roll < 0.2:  # gas rising above fluid (patient supine: anterior = up in the image)
            level_y = cy + r * rng.uniform(-0.8, 0.6)
            gas = lumen & (g.y < level_y)
            hu[gas] = rng.uniform(-950, -750)
        elif roll < 0.35:  # faeces: mottled gas and soft tissue
            mottled = fine > 0.5
            hu[lumen] = np.where(mottled[lumen], rng.uniform(-600, -300), rng.uniform(0, 40))

    # Great vessels.
    enhancement = rng.uniform(0.6, 1.15)  # contrast phase / timing
    ar = rng.uniform(0.035, 0.05) * scale
    ax, ay = sx + rng.uniform(0.03, 0.09) * scale, sy - vr - ar - 0.01
    aorta = g.ellipse(ax, ay, ar, ar) & cavity
    hu[aorta] = 40 + 190 * enhancement + rng.normal(0, 8)
    solid = aorta.copy()  # structures a lesion must not overwrite: vessels and bone
    if rng.random() < 0.15:  # wall calcification: a dense dot outside the kidneys (a stone look-alike)
        ang = rng.uniform(0, 2 * math.pi)
        calc = g.ellipse(ax + ar * math.cos(ang), ay + ar * math.sin(ang), 0.02 * scale, 0.02 * scale) & cavity
        hu[calc] = rng.uniform(400, 800)
    ivc = g.ellipse(sx - rng.uniform(0.08, 0.13) * scale, sy - vr - 0.02, 0.055 * scale, 0.038 * scale, rng.uniform(-0.3, 0.3)) & cavity
    hu[ivc] = 40 + 110 * enhancement + rng.normal(0, 8)
    solid |= ivc

    # Kidney geometry first, so perirenal fat can clear room before the vertebra is drawn.
    kidneys: list[_Kidney] = []
    for s in (-1, 1):
        a = rng.uniform(0.15, 0.19) * scale
        b = a * rng.uniform(0.62, 0.8)
        cx = sx + s * (vr + rng.uniform(0.12, 0.2) * scale + b * 0.6)
        cy = sy + rng.uniform(-0.07, 0.05) * scale
        tilt = math.radians(rng.uniform(40, 75))
        e1 = (s * math.cos(tilt), -math.sin(tilt))  # long axis: antero-lateral <-> postero-medial
        e2 = (-e1[1], e1[0])
        if e2[0] * s > 0:  # point towards the hilum: medial (towards the spine)
            e2 = (-e2[0], -e2[1])
        kidneys.append(_Kidney(cx, cy, a, b, e1, e2))
        peri = g.ellipse(cx, cy, a * 1.3 + 0.02, b * 1.35 + 0.02, math.atan2(e1[1], e1[0])) & cavity
        hu[peri] = rng.uniform(-100, -75) + drift[peri]

    # Vertebra: cancellous core, cortical rim, canal, posterior arch and spinous process.
    bone_hu = rng.uniform(700, 1000)
    cancellous_hu = rng.uniform(150, 260)
    vbody = g.ellipse(sx, sy, vr * 1.1, vr, p=2.3)
    hu[vbody] = bone_hu
    solid |= vbody
    core = g.ellipse(sx, sy, vr * 1.1 - 0.018, vr - 0.018, p=2.3)
    hu[core] = cancellous_hu + 20 * fine[core]
    canal_r = 0.045 * scale
    canal_y = sy + vr + canal_r + 0.01
    arch = g.ellipse(sx, canal_y + 0.01, canal_r * 1.9, canal_r * 1.7)
    spinous = g.ellipse(sx, canal_y + canal_r * 2.5, 0.022 * scale, min(0.09 * scale, back - canal_y), 0.0)
    transverse = g.ellipse(sx, canal_y - 0.005, vr * 2.1, 0.022 * scale)
    for part in (arch, spinous, transverse):
        part &= body
        hu[part] = bone_hu * rng.uniform(0.7, 0.95)
        solid |= part
    canal = g.ellipse(sx, canal_y, canal_r, canal_r * 0.9)
    hu[canal] = rng.uniform(5, 25)

    # Ribs: small dense ovals just inside the wall, postero-laterally.
    for s in (-1, 1):
        for angle in rng.uniform(0.15, 1.2, size=int(rng.integers(1, 4))):
            t = math.pi / 2 + s * (math.pi / 2 - angle)  # measured from the lateral side
            rx = bcx + (ba - fat - 0.5 * wall) * math.cos(t)
            ry = bcy + (bb - 0.8 * fat - 0.5 * wall) * math.sin(t)
            rib = g.ellipse(rx, ry, 0.035 * scale, 0.016 * scale, t + math.pi / 2) & body
            hu[rib] = rng.uniform(500, 900)
            solid |= rib
            marrow = g.ellipse(rx, ry, 0.02 * scale, 0.006 * scale, t + math.pi / 2) & rib
            hu[marrow] = rng.uniform(150, 300)

    # Kidneys: bean outline (hilar notch), cortex, medullary pyramids, sinus fat, pelvis.
    cortex_hu = 40 + 130 * enhancement + rng.normal(0, 6)
    # Corticomedullary phase (dark pyramids) or nephrographic phase (nearly uniform parenchyma).
    medulla_drop = (rng.uniform(15, 40) if rng.random() < 0.5 else rng.uniform(0, 10)) * enhancement
    kidney_masks, sinus_masks = [], []
    for k in kidneys:
        u, v = k.local(g)
        notch = ((u / 0.3) ** 2 + ((v - 1.0) / rng.uniform(0.3, 0.5)) ** 2) <= 1.0
        outline = (u * u + v * v <= 1.0) & ~notch
        outline &= cavity & ~solid
        hu[outline] = cortex_hu + 0.5 * drift[outline]
        for ang in np.linspace(-2.6, 2.6, 6) + rng.normal(0, 0.15, 6):
            pu, pv = 0.55 * math.sin(ang), -0.5 * math.cos(ang) + 0.15
            pyramid = (((u - pu) / 0.22) ** 2 + ((v - pv) / 0.2) ** 2 <= 1.0) & outline
            hu[pyramid] = cortex_hu - medulla_drop
        sinus = (((u / 0.28) ** 2 + ((v - 0.5) / 0.22) ** 2) <= 1.0) & outline
        hu[sinus] = rng.uniform(-70, -30)
        pelvis = (((u / 0.14) ** 2 + ((v - 0.72) / 0.16) ** 2) <= 1.0) & cavity & ~solid
        hu[pelvis] = rng.uniform(-40, -5)  # collapsed pelvis and hilar vessels in fat
        kidney_masks.append(outline)
        sinus_masks.append(sinus | pelvis)
    return _Scene(hu=hu, body=body, cavity=cavity, allowed=cavity & ~solid, kidneys=kidneys, kidney_masks=kidney_masks,
                  sinus_masks=sinus_masks, scale=scale)


# ----------------------------------------------------------------------------- lesions


def _lesion(rng: np.random.Generator, g: _Grid, scene: _Scene, label: str) -> np.ndarray:
    """Draw the class's lesion into ``scene.hu`` (in place); return its mask."""
    mask = np.zeros_like(scene.cavity)
    if label == "Normal":
        return mask
    side = int(rng.integers(0, 2))
    k = scene.kidneys[side]
    hu = scene.hu
    size = g.size
    scale = scene.scale
    if label == "Cyst":
        r = min(rng.uniform(0.10, 0.15) * scale, 1.0 * k.b)
        ang = rng.uniform(-0.75 * math.pi, 0.75 * math.pi)  # away from the hilum (which is at +v)
        rho = rng.uniform(0.0, 0.5) if rng.random() < 0.7 else rng.uniform(0.5, 0.9)  # some exophytic
        cx, cy = k.to_grid(rho * math.sin(ang), -rho * math.cos(ang))
        mask = g.ellipse(cx, cy, r, r * rng.uniform(0.9, 1.0), rng.uniform(0, math.pi)) & scene.allowed
        hu[mask] = rng.uniform(0, 20)
    elif label == "Stone":
        r_min = MIN_STONE_RADIUS_PX_AT_64 * 2.0 / 64
        n = 2 if rng.random() < 0.2 else 1
        for _ in range(n):
            r = rng.uniform(r_min, 1.6 * r_min)
            u, v = rng.uniform(-0.45, 0.45), rng.uniform(-0.2, 0.7)
            cx, cy = k.to_grid(u, v)
            stone = g.blob(cx, cy, r * rng.uniform(1.0, 1.3), r, rng.uniform(0, math.pi), _harmonics(rng, 3, 0.12)) & scene.allowed
            hu[stone] = rng.uniform(500, 1200)
            mask |= stone
    elif label == "Tumor":
        r = rng.uniform(0.18, 0.27) * scale
        ang = rng.uniform(-math.pi, math.pi)
        rho = rng.uniform(0.3, 0.9)
        cx, cy = k.to_grid(rho * math.sin(ang), -rho * math.cos(ang))
        mask = g.blob(cx, cy, r * rng.uniform(1.0, 1.3), r, rng.uniform(0, math.pi), _harmonics(rng, 5, 0.35)) & scene.allowed
        base = rng.uniform(65, 100)
        texture = rng.uniform(18, 28) * _smooth_noise(rng, size, rng.uniform(1.0, 2.0) * size / 128)
        tumour = base + texture
        if rng.random() < 0.6:  # necrotic centre
            necrosis = g.blob(cx, cy, r * 0.5, r * 0.45, rng.uniform(0, math.pi), _harmonics(rng, 4, 0.3))
            tumour = np.where(necrosis, rng.uniform(10, 35) + 0.5 * texture, tumour)
        hu[mask] = np.clip(tumour, 10, 150)[mask]
    else:
        raise ValueError(f"unknown phantom class {label!r}; allowed: {list(CANONICAL_CLASSES)}")
    if label != "Normal" and not mask.any():  # cannot happen with sane geometry; never emit an empty lesion
        raise RuntimeError("phantom lesion fell outside the body")
    return mask


# ----------------------------------------------------------------------------- rendering


@dataclass(frozen=True)
class SliceHU:
    """One rendered slice before windowing."""

    hu: np.ndarray  # acquired HU: blurred, with scanner noise (float32)
    clean_hu: np.ndarray  # the phantom's true HU, before blur and noise (float32)
    mask: np.ndarray  # lesion mask (bool); all False for Normal
    bbox: BBox | None  # (x0, y0, x1, y1), exclusive end; None for Normal
    body: np.ndarray  # body outline (bool), table excluded
    lesion_mean_hu: float | None  # the lesion's true mean density, before any resampling; None for Normal


def render_slice_hu(rng: np.random.Generator, label: str, size: int, noise_hu: float, blur_sigma: float) -> SliceHU:
    """Render one slice of class ``label`` in HU (see ``SliceHU``)."""
    if label not in CANONICAL_CLASSES:
        raise ValueError(f"unknown phantom class {label!r}; allowed: {list(CANONICAL_CLASSES)}")
    g = _Grid(size)
    scene = _anatomy(rng, g)
    mask = _lesion(rng, g, scene, label)
    clean, body = scene.hu, scene.body
    lesion_mean = float(clean[mask].mean()) if mask.any() else None
    # The patient lies a little rotated on the table; the table itself stays level.
    angle = rng.uniform(-12.0, 12.0)
    # Nearest-neighbour, like the masks: every rotated pixel keeps a true tissue value, and the mask
    # covers exactly the lesion's pixels (the blur below smooths the edges).
    clean = ndimage.rotate(clean, angle, reshape=False, order=0, mode="constant", cval=AIR_HU)
    mask = ndimage.rotate(mask.astype(np.uint8), angle, reshape=False, order=0, mode="constant", cval=0) > 0
    body = ndimage.rotate(body.astype(np.uint8), angle, reshape=False, order=0, mode="constant", cval=0) > 0
    mask &= body
    if label != "Normal" and not mask.any():  # cannot happen with sane geometry; never emit an empty lesion
        raise RuntimeError("phantom lesion fell outside the image")
    _draw_table(rng, g, clean, body)
    acquired = ndimage.gaussian_filter(clean, blur_sigma, mode="nearest") if blur_sigma > 0 else clean.copy()
    if noise_hu > 0:
        # CT noise is spatially correlated: smooth white noise a little, rescale to the wanted std.
        acquired += noise_hu * rng.uniform(0.75, 1.35) * _smooth_noise(rng, size, 0.6)
    return SliceHU(
        hu=acquired.astype(np.float32),
        clean_hu=clean.astype(np.float32),
        mask=mask,
        bbox=_bbox(mask),
        body=body,
        lesion_mean_hu=lesion_mean,
    )


def _draw_table(rng: np.random.Generator, g: _Grid, hu: np.ndarray, body: np.ndarray) -> None:
    """CT table: two thin anti-aliased arcs under the body, rising at the sides (a cradle)."""
    rows = np.flatnonzero(body.any(axis=1))
    bottom = (rows[-1] + 1) * g.px - 1.0 if rows.size else 0.8
    table_y = bottom + rng.uniform(0.02, 0.05)
    curve = -rng.uniform(0.08, 0.2)
    free = hu <= AIR_HU + 1.0
    for offset, value in ((0.0, rng.uniform(150, 350)), (rng.uniform(0.04, 0.08), rng.uniform(50, 200))):
        weight = np.clip(1.6 - np.abs(g.y - (table_y + offset + curve * g.x**2)) / g.px, 0.0, 1.0)
        weight[~free] = 0.0
        hu += weight * (value - hu)


def render_slice(
    rng: np.random.Generator, label: str, size: int, noise_hu: float, blur_sigma: float, window: WindowConfig
) -> tuple[np.ndarray, np.ndarray, BBox | None]:
    """Render one windowed slice: (uint8 image, bool lesion mask, bbox or None for Normal)."""
    s = render_slice_hu(rng, label, size, noise_hu, blur_sigma)
    return window_hu(s.hu, window), s.mask, s.bbox


# ----------------------------------------------------------------------------- data set


def image_rng(seed: int, label: str, k: int) -> np.random.Generator:
    """The generator of image ``k`` (1-based) of class ``label``: independent of generation order."""
    return np.random.default_rng(np.random.SeedSequence([int(seed) % 2**63, CANONICAL_CLASSES.index(label), int(k)]))


def _clear_out_dir(out: Path) -> None:
    """Remove a previous phantom; refuse to wipe a folder that does not look like one."""
    if not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"phantom.out_dir exists and is not a folder: {out}")
    ours = set(CANONICAL_CLASSES) | {MASK_DIR, INDEX_FILE}
    foreign = sorted(p.name for p in out.iterdir() if p.name not in ours)
    if foreign:
        raise UserError(
            f"phantom.out_dir {out} holds files the phantom did not write ({foreign[:5]}); "
            "refusing to delete it: choose an empty or new folder"
        )
    shutil.rmtree(out)


def generate_phantom(cfg: PhantomConfig, seed: int) -> pd.DataFrame:
    """Write the phantom data set to ``cfg.out_dir`` (replacing a previous one); return its index.

    Layout: ``<Class>/<Class>- (<k>).png`` (8-bit greyscale), ``_masks/<Class>/<same name>`` (lesion
    masks, 0/255) and ``kidneyData.csv`` with columns ``image_id, path, diag, target, Class``
    (as the public data set's index; target = position in alphabetical ``CANONICAL_CLASSES``) plus
    ``mask_path, x0, y0, x1, y1`` (empty for Normal) and ``lesion_mean_hu`` (the lesion's true mean
    density before blur and noise; empty for Normal). Paths are relative to ``out_dir``.
    """
    out = Path(cfg.out_dir)
    _clear_out_dir(out)
    counts = class_counts(cfg.n_images, cfg.proportions)
    rows = []
    for label in CANONICAL_CLASSES:
        n = counts.get(label, 0)
        if n == 0:
            continue
        (out / label).mkdir(parents=True, exist_ok=True)
        (out / MASK_DIR / label).mkdir(parents=True, exist_ok=True)
        for k in range(1, n + 1):
            rng = image_rng(seed, label, k)
            s = render_slice_hu(rng, label, cfg.image_size, cfg.noise_hu, cfg.blur_sigma)
            name = f"{label}- ({k}).png"
            rel_image = f"{label}/{name}"
            rel_mask = f"{MASK_DIR}/{label}/{name}"
            Image.fromarray(window_hu(s.hu, cfg.window)).save(out / rel_image)
            Image.fromarray(s.mask.astype(np.uint8) * 255).save(out / rel_mask)
            x0, y0, x1, y1 = s.bbox if s.bbox is not None else (None, None, None, None)
            mean = s.lesion_mean_hu
            rows.append(
                {
                    "image_id": f"{label}- ({k})",
                    "path": rel_image,
                    "diag": label,
                    "target": CANONICAL_CLASSES.index(label),
                    "Class": label,
                    "mask_path": rel_mask,
                    "x0": x0,
                    "y0": y0,
                    "x1": x1,
                    "y1": y1,
                    "lesion_mean_hu": None if mean is None else round(mean, 1),
                }
            )
    index = pd.DataFrame(rows, columns=CSV_COLUMNS)
    for col in ("x0", "y0", "x1", "y1"):
        index[col] = index[col].astype("Int64")
    index["lesion_mean_hu"] = index["lesion_mean_hu"].astype("Float64")
    index.to_csv(out / INDEX_FILE, index=False)
    return index


# ----------------------------------------------------------------------------- new patients, other scanners


def scanner_of(phantom: PhantomConfig) -> ScannerConfig:
    """The scanner that acquired the training phantom."""
    return ScannerConfig(noise_hu=phantom.noise_hu, blur_sigma=phantom.blur_sigma, window=phantom.window,
                         image_size=phantom.image_size, field_of_view=1.0)


def render_with_scanner(rng: np.random.Generator, label: str, scanner: ScannerConfig, attempts: int = 20) -> np.ndarray:
    """One windowed slice as ``scanner`` acquires it. A field of view below 1 renders the body on a
    larger grid and keeps the centre, so anatomy fills more of the frame; a lesion must keep at least
    half its pixels inside the crop (else the patient is drawn again), so the label stays true."""
    full = max(scanner.image_size, round(scanner.image_size / scanner.field_of_view))
    start = (full - scanner.image_size) // 2
    crop = (slice(start, start + scanner.image_size), slice(start, start + scanner.image_size))
    for _ in range(attempts):
        s = render_slice_hu(rng, label, full, scanner.noise_hu, scanner.blur_sigma)
        if label == "Normal" or s.mask[crop].sum() * 2 >= s.mask.sum():
            return window_hu(s.hu[crop], scanner.window)
    raise RuntimeError(f"no {label} lesion stayed inside a field of view of {scanner.field_of_view}")


def generate_batch(cfg: PhantomBatchConfig, phantom: PhantomConfig) -> dict[str, int]:
    """Write a labelled batch of new phantom patients (class folders of PNGs) to ``cfg.out_dir``,
    acquired by the training phantom's scanner (``scanner: same``) or by ``cfg.other``; returns the
    class counts. Classes follow ``phantom.proportions``."""
    out = Path(cfg.out_dir)
    if out.exists():
        if not out.is_dir():
            raise UserError(f"monitor.phantom_batch.out_dir exists and is not a folder: {out}")
        foreign = sorted(p.name for p in out.iterdir() if p.name not in CANONICAL_CLASSES)
        if foreign:
            raise UserError(f"monitor.phantom_batch.out_dir {out} holds files the batch did not write ({foreign[:5]}); "
                            "refusing to delete it: choose an empty or new folder")
        shutil.rmtree(out)
    scanner = scanner_of(phantom) if cfg.scanner == "same" else cfg.other
    counts = class_counts(cfg.n_images, phantom.proportions)
    for label, n in counts.items():
        (out / label).mkdir(parents=True, exist_ok=True)
        for k in range(1, n + 1):
            pixels = render_with_scanner(image_rng(cfg.seed, label, k), label, scanner)
            Image.fromarray(pixels).save(out / label / f"{label}- ({k}).png")
    return {label: n for label, n in counts.items() if n}
