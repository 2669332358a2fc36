"""Loader-side augmentation: the transform ranges, the geometry convention, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from helpers.params import section
from tumorscope.data.augment import augment_batch, random_affines


def _slices(n: int = 16, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, 256, (n, size, size, 1), dtype=np.uint8)


def test_strength_zero_returns_the_batch_unchanged():
    batch = _slices()
    assert augment_batch(batch, 0.0, np.random.default_rng(0)) is batch


@pytest.mark.parametrize("strength", [0.05, 0.2, 0.5])
def test_affine_parameters_stay_within_the_keras_layers_ranges(strength):
    size = 64
    matrices, offsets = random_affines(np.random.default_rng(1), 2000, strength, size)
    flips = np.sign(np.linalg.det(matrices))
    zooms = np.sqrt(np.abs(np.linalg.det(matrices)))
    unflipped = matrices.copy()
    unflipped[:, :, 1] *= flips[:, None]  # undo the column flip: a rotation times a zoom remains
    angles = np.arctan2(unflipped[:, 1, 0], unflipped[:, 0, 0])
    # RandomRotation(strength / 2): a fraction of a full turn; RandomZoom(strength); RandomFlip.
    assert np.abs(angles).max() <= np.pi * strength + 1e-9
    assert np.abs(angles).max() > 0.9 * np.pi * strength
    assert zooms.min() >= 1 - strength - 1e-9 and zooms.max() <= 1 + strength + 1e-9
    assert 0.45 < np.mean(flips < 0) < 0.55
    # RandomTranslation(strength / 2, strength / 2): the centre maps to within that shift.
    centre = np.full(2, (size - 1) / 2.0)
    shifts = centre - (matrices @ centre + offsets)
    assert np.abs(shifts).max() <= strength / 2 * size + 1e-6


def test_a_vanishing_strength_gives_the_slice_or_its_mirror_image_exactly():
    batch = _slices(64)
    out = augment_batch(batch, 1e-9, np.random.default_rng(3))
    same = np.all(out == batch, axis=(1, 2, 3))
    mirrored = np.all(out == batch[:, :, ::-1], axis=(1, 2, 3))
    assert np.all(same | mirrored)
    assert same.any() and mirrored.any()


def test_zoom_out_and_shifts_fill_the_border_with_zero_and_keep_the_range():
    batch = np.full((32, 32, 32, 1), 200, dtype=np.uint8)
    out = augment_batch(batch, 0.4, np.random.default_rng(4))
    assert out.dtype == np.uint8 and out.shape == batch.shape
    assert set(np.unique(out)) <= set(range(0, 201))
    borders = np.concatenate([out[:, 0].ravel(), out[:, -1].ravel(), out[:, :, 0].ravel(), out[:, :, -1].ravel()])
    assert np.mean(borders == 0) > 0.2  # content moved off the edges somewhere
    assert np.all(out[:, 16, 16, 0] == 200)  # the centre stays inside every warp at this strength


def test_the_same_generator_state_gives_the_same_pixels_and_another_does_not():
    batch = _slices()
    first = augment_batch(batch, 0.2, np.random.default_rng(7))
    again = augment_batch(batch, 0.2, np.random.default_rng(7))
    other = augment_batch(batch, 0.2, np.random.default_rng(8))
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_loader_batches_are_seeded_by_epoch_and_index_not_by_access_order():
    from tumorscope.models.train import make_batches

    images, labels = _slices(64), np.arange(64) % 4

    def loader():
        return make_batches(images, labels, 16, shuffle=True, seed=5, augment_strength=0.2)

    forward, backward = loader(), loader()
    in_order = [forward[i][0] for i in range(4)]
    reversed_order = [backward[i][0] for i in reversed(range(4))][::-1]
    assert all(np.array_equal(a, b) for a, b in zip(in_order, reversed_order, strict=True))
    assert not np.array_equal(in_order[0], images[np.sort(forward.order_of(0)[:16])])  # it did augment
    assert np.array_equal(forward[0][0], in_order[0])  # reading again changes nothing
    forward.epoch = 1
    assert not np.array_equal(forward[0][0], in_order[0])  # a new epoch draws new order and warps


def test_loader_reads_ahead_of_an_epoch_change_leave_no_trace():
    """Keras opens the next epoch's iterator, TensorFlow's prefetch thread reads from it, and Keras
    probes batches for the output signature, at moments set by thread timing. Reads must not change
    what an epoch's batches are."""
    from tumorscope.models.train import make_batches

    images, labels = _slices(64), np.arange(64) % 4

    def epoch_one(reads_before: int) -> list[np.ndarray]:
        batches = make_batches(images, labels, 16, shuffle=True, seed=5, augment_strength=0.2)
        for i in range(reads_before):
            batches[i % 4]
        batches.epoch_callback().on_epoch_begin(1)
        return [batches[i][0] for i in range(4)]

    reference = epoch_one(0)
    for reads_before in (1, 2, 7):
        assert all(np.array_equal(a, b) for a, b in zip(reference, epoch_one(reads_before), strict=True))


def test_fit_moves_the_loader_through_its_epochs():
    """In a real fit the callback sets each epoch before its batches are read: after 3 epochs the
    loader is at epoch 2, and every sample was drawn once per epoch (orders are permutations)."""
    import keras

    from tumorscope.models.train import make_batches

    images, labels = _slices(48), np.arange(48) % 4
    batches = make_batches(images, labels, 16, shuffle=True, seed=5)
    model = keras.Sequential([keras.Input((32, 32, 1)), keras.layers.Flatten(), keras.layers.Dense(4, activation="softmax")])
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    model.fit(batches, epochs=3, shuffle=False, verbose=0, callbacks=[batches.epoch_callback()])
    assert batches.epoch == 2
    for epoch in range(1, 3):
        assert sorted(batches.order_of(epoch)) == list(range(48))


@pytest.mark.parametrize("place", ["loader", "model"])
def test_augment_in_sends_the_strength_to_one_place_only(place):
    from tumorscope.config import TrainConfig
    from tumorscope.models.zoo import model_options

    cfg = section(TrainConfig, augment_strength=0.2, augment_in=place)
    other = "model" if place == "loader" else "loader"
    assert cfg.augment_strength_in(place) == 0.2 and cfg.augment_strength_in(other) == 0.0
    # the model is built with augmentation layers only when they are where it runs
    assert model_options(cfg, seed=0)["augment_strength"] == cfg.augment_strength_in("model")


@pytest.mark.parametrize("workers", [2, 3, 7, 40])
def test_loader_threads_give_the_same_pixels_as_one(workers):
    """The random draws are made before the work is split: any number of threads (more than the
    batch's images too) warps and re-windows each batch exactly as one thread does."""
    from tumorscope.data.augment import augment_intensity
    from tumorscope.models.train import make_batches

    batch = _slices(13)
    assert np.array_equal(augment_batch(batch, 0.3, np.random.default_rng(2), workers),
                          augment_batch(batch, 0.3, np.random.default_rng(2)))
    assert np.array_equal(augment_intensity(batch, 0.3, np.random.default_rng(2), workers),
                          augment_intensity(batch, 0.3, np.random.default_rng(2)))
    images, labels = _slices(40), np.arange(40) % 4

    def loader(threads: int):
        return make_batches(images, labels, 16, shuffle=True, seed=5, augment_strength=0.2,
                            intensity_strength=0.2, workers=threads)

    one, many = loader(1), loader(workers)
    for index in range(len(one)):
        assert np.array_equal(one[index][0], many[index][0])
        assert np.array_equal(one[index][1], many[index][1])


def test_loader_workers_zero_means_one_per_core_at_most_eight():
    import os

    from tumorscope.data.augment import loader_threads

    assert loader_threads(3) == 3
    assert loader_threads(0) == min(8, len(os.sched_getaffinity(0)))


def _body_slices(n: int = 12, size: int = 48) -> np.ndarray:
    """A bright disc with a darker spot on a noisy background: something CLAHE and blur change."""
    yy, xx = np.mgrid[:size, :size]
    rng = np.random.default_rng(3)
    out = np.empty((n, size, size, 1), np.uint8)
    for i in range(n):
        disc = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 3) ** 2) * (120 + 5 * i)
        spot = ((yy - size / 2 - 4) ** 2 + (xx - size / 2) ** 2 < 16) * 80
        out[i, ..., 0] = np.clip(disc + spot + rng.normal(0, 6, (size, size)), 0, 255).astype(np.uint8)
    return out


def test_export_randomisation_off_is_identity_and_on_changes_every_slice_within_uint8():
    from tumorscope.data.augment import randomise_export

    batch = _body_slices()
    assert randomise_export(batch, 0.0, np.random.default_rng(0)) is batch
    changed = randomise_export(batch, 1.0, np.random.default_rng(0))
    assert changed.shape == batch.shape and changed.dtype == np.uint8
    differs = np.abs(changed.astype(int) - batch).reshape(len(batch), -1).mean(axis=1)
    assert (differs > 1.0).all()  # every transform on: no slice comes through as it was


@pytest.mark.parametrize("name", ["resize", "blur", "unsharp", "clahe", "window", "gamma", "jpeg"])
def test_each_export_transform_alone_changes_the_slice(name):
    """A transform that silently did nothing (a wrong parameter unit, a dropped result) would let
    one kind of export through untouched."""
    from tumorscope.data.augment import EXPORT_TRANSFORMS, export_draws, export_variant

    image = _body_slices(1)[0, ..., 0]
    draw = export_draws(np.random.default_rng(1), 1, 1.0)[0]
    draw["on"] = {k: k == name for k in EXPORT_TRANSFORMS}
    assert np.abs(export_variant(image, draw).astype(int) - image).mean() > 0.5


@pytest.mark.parametrize("workers", [1, 3])
def test_export_randomisation_is_seeded_and_thread_independent(workers):
    from tumorscope.data.augment import randomise_export
    from tumorscope.models.train import make_batches

    batch = _body_slices()
    one = randomise_export(batch, 0.5, np.random.default_rng(4))
    assert np.array_equal(one, randomise_export(batch, 0.5, np.random.default_rng(4), workers))
    assert not np.array_equal(one, randomise_export(batch, 0.5, np.random.default_rng(5)))
    loader = make_batches(batch, np.arange(len(batch)) % 4, 4, shuffle=True, seed=1, export_strength=0.5,
                          workers=workers)
    plain = make_batches(batch, np.arange(len(batch)) % 4, 4, shuffle=True, seed=1)
    assert any(not np.array_equal(loader[i][0], plain[i][0]) for i in range(len(loader)))
