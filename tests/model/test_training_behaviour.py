"""Behaviour of a briefly trained model: it must not collapse to one class at inference time.

Keras 3 models with BatchNormalization were seen predicting one class for every image after short
training (moving statistics lag the weights). These tests train on a small phantom and check the
inference-mode (predict) outputs, for each normalisation choice the config offers.
"""

from __future__ import annotations

import numpy as np
import pytest

from helpers.params import section
from tumorscope.config import PhantomConfig, PreprocessConfig, TrainConfig, WindowConfig
from tumorscope.data.images import read_greyscale
from tumorscope.data.phantom import generate_phantom
from tumorscope.data.preprocess import prepare_slice
from tumorscope.inference import predict_proba
from tumorscope.models.evaluate import degenerate_predictions
from tumorscope.models.saving import save_model
from tumorscope.models.train import train_model
from tumorscope.models.zoo import build_model

SIZE = 48


@pytest.fixture(scope="module")
def phantom_arrays(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantom")
    index = generate_phantom(section(PhantomConfig, out_dir=str(out), n_images=320, image_size=96), seed=3)
    cfg = section(PreprocessConfig, image_size=SIZE)
    images = np.stack([prepare_slice(read_greyscale(out / p, section(WindowConfig))[0], cfg) for p in index["path"]])[..., None]
    classes = sorted(index["Class"].unique())
    labels = index["Class"].map({c: i for i, c in enumerate(classes)}).to_numpy(np.int32)
    order = np.random.default_rng(0).permutation(len(labels))
    cut = int(0.75 * len(order))
    return (images[order[:cut]], labels[order[:cut]]), (images[order[cut:]], labels[order[cut:]])


@pytest.fixture(scope="module")
def findings_arrays():
    """A task both normalisation choices learn in a few epochs on either backend: noisy dark
    slices, class 0 without a finding, classes 1-3 with a bright square, a horizontal bar or a
    vertical bar anywhere in the slice (translation- and flip-invariant, as the model's global max
    pooling and augmentation assume). On the phantom at this size the CNN without normalisation
    stayed at chance for 20-30 epochs on both backends, so a non-constant prediction there was
    luck, not evidence (it passed on TensorFlow and failed on JAX)."""
    rng = np.random.default_rng(0)
    n = 320
    labels = rng.integers(0, 4, n).astype(np.int32)
    images = np.clip(rng.normal(40, 15, (n, SIZE, SIZE)), 0, 255)
    shapes = {1: (6, 6), 2: (3, 14), 3: (14, 3)}
    for i, label in enumerate(labels):
        if label:
            height, width = shapes[int(label)]
            row, col = rng.integers(4, SIZE - height - 4), rng.integers(4, SIZE - width - 4)
            images[i, row:row + height, col:col + width] = rng.normal(200, 20)
    images = images.astype(np.uint8)[..., None]
    cut = int(0.75 * n)
    return (images[:cut], labels[:cut]), (images[cut:], labels[cut:])


@pytest.mark.parametrize("norm", ["none", "batch"])
def test_a_model_that_learned_keeps_its_skill_in_inference_mode(findings_arrays, norm):
    """Training-mode accuracy near 1 and inference-mode (predict) predictions that are not one
    class and score well: the BatchNormalization lag (docs/decisions/0002) would show as the gap between
    the two. With train.warmup_epochs: 0 TensorFlow's BatchNormalization model restored an early
    epoch whose predict() never chose class 0 (validation accuracy 0.71); the default warm-up is
    what this tests."""
    import keras

    (x_train, y_train), (x_val, y_val) = findings_arrays
    keras.utils.set_random_seed(0)
    cfg = section(TrainConfig, epochs=15, batch_size=16, lr=1e-3, patience=20, norm=norm)
    model = build_model("small_cnn", SIZE, 4, norm=norm, seed=0)
    result = train_model(model, (x_train, y_train), (x_val, y_val), cfg, seed=0)
    assert max(result.history["accuracy"][-3:]) >= 0.9, f"{norm}: the model did not learn the task"
    predicted = predict_proba(result.model, x_val).argmax(axis=1)
    assert degenerate_predictions(y_val, predicted, 0.95) is None
    assert len(np.unique(predicted)) == 4, f"{norm}: predictions {np.bincount(predicted, minlength=4)}"
    assert np.mean(predicted == y_val) >= 0.8, f"{norm}: inference-mode accuracy {np.mean(predicted == y_val):.2f}"


def test_saved_keras_file_loads_back_with_identical_predictions(phantom_arrays, tmp_path):
    import keras

    (x_train, y_train), (x_val, _) = phantom_arrays
    model = build_model("small_cnn", SIZE, 4, seed=0)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    model.fit(x_train[:64], y_train[:64], epochs=1, verbose=0)
    path = save_model(model, tmp_path / "models")
    assert path.suffix == ".keras"
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(predict_proba(loaded, x_val), predict_proba(model, x_val), atol=1e-6)


def test_unknown_architecture_is_rejected():
    with pytest.raises(ValueError, match="unknown architecture 'vit'"):
        build_model("vit", SIZE, 4)


def test_precision_policy_follows_the_device():
    import keras

    from tumorscope.models.devices import accelerator, set_precision

    try:
        expected = "mixed_float16" if accelerator() == "gpu" else "float32"
        assert set_precision("auto") == expected == keras.config.dtype_policy().name
        assert set_precision("mixed_bfloat16") == "mixed_bfloat16"
        model = build_model("small_cnn", 32, 4, filters=4, dense_units=8, augment_strength=0.0, norm="none")
        assert model.get_layer("probabilities").dtype_policy.compute_dtype == "float32"  # stable softmax/loss
    finally:
        keras.config.set_dtype_policy("float32")


@pytest.mark.parametrize("monitor", ["val_macro_f1", "val_loss"])
def test_early_stopping_restores_the_best_epoch_of_the_monitored_score(phantom_arrays, monitor):
    import keras

    from tumorscope.models.evaluate import confusion, macro_f1_from_confusion

    (x_train, y_train), (x_val, y_val) = phantom_arrays
    keras.utils.set_random_seed(0)
    # No warm-up: the callbacks must act within these 8 epochs (the warm-up has its own test).
    cfg = section(TrainConfig, epochs=8, batch_size=16, lr=3e-3, patience=2, monitor=monitor, warmup_epochs=0)
    # norm none: with BatchNormalization the post-training recalibration (by design) moves the
    # statistics away from those the epoch was scored with.
    model = build_model("small_cnn", SIZE, 4, norm="none", seed=0)
    result = train_model(model, (x_train, y_train), (x_val, y_val), cfg, seed=0, critical_index=3)
    assert {"val_macro_f1", "val_critical_recall"} <= set(result.history)
    # The restored weights score the monitored optimum on the validation split.
    predicted = predict_proba(result.model, x_val).argmax(axis=1)
    restored = float(macro_f1_from_confusion(confusion(y_val, predicted, 4)[None])[0])
    history = result.history[monitor]
    best = int(np.argmin(history) if monitor == "val_loss" else np.argmax(history))
    assert restored == pytest.approx(result.history["val_macro_f1"][best], abs=1e-6)


@pytest.mark.parametrize("monitor, better, worse", [("val_macro_f1", 0.6, 0.5), ("val_loss", 0.5, 0.6)])
def test_plateau_callbacks_watch_the_monitor_in_the_right_direction(monitor, better, worse):
    from tumorscope.models.train import plateau_callbacks

    for callback in plateau_callbacks(section(TrainConfig, monitor=monitor, patience=4)):
        assert callback.monitor == monitor
        if hasattr(callback, "_set_monitor_op"):  # EarlyStopping sets its comparison lazily
            callback._set_monitor_op()
            assert callback._is_improvement(better, worse) and not callback._is_improvement(worse, better)
        else:
            assert callback.monitor_op(better, worse) and not callback.monitor_op(worse, better)


def test_warmup_epochs_are_ignored_by_early_stopping_and_the_lr_halving():
    """The collapse seen with val_loss: its minimum after epoch 1 was restored and halved the
    learning rate from there. Within train.warmup_epochs neither callback reacts."""
    import keras

    from tumorscope.models.train import plateau_callbacks

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)])
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    stop, shrink = plateau_callbacks(section(TrainConfig, monitor="val_loss", patience=2, warmup_epochs=4))
    for callback in (stop, shrink):
        callback.set_model(model)
        callback.on_train_begin()

    def learning_rate() -> float:
        return float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))

    for epoch, loss in enumerate([0.1, 0.9, 0.9, 0.9, 0.5, 0.6, 0.6]):
        for callback in (stop, shrink):
            callback.on_epoch_end(epoch, {"val_loss": loss})
        if epoch < 4:
            assert learning_rate() == pytest.approx(1e-3) and not model.stop_training
    assert stop.best == 0.5  # the warm-up minimum (0.1 at epoch 0) is not the one restored
    assert learning_rate() < 1e-3 and model.stop_training  # after the warm-up both act as before


def test_a_fit_can_start_from_another_models_weights_of_the_same_build(tmp_path):
    """train.init_weights: the champion's weights as the start of a retraining, refused in one line
    when the file is missing or another model."""
    from tumorscope.errors import UserError
    from tumorscope.models.saving import save_model
    from tumorscope.models.train import start_from
    from tumorscope.models.zoo import build_configured

    cfg = section(TrainConfig, epochs=1)
    first = build_configured(cfg, 32, 4, seed=1)
    saved = str(save_model(first, tmp_path / "first"))
    second = build_configured(cfg, 32, 4, seed=2)
    assert any(not np.array_equal(a, b) for a, b in zip(first.get_weights(), second.get_weights(), strict=True))
    start_from(second, saved)
    for a, b in zip(first.get_weights(), second.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    wider = build_configured(section(TrainConfig, filters=32), 32, 4, seed=0)
    with pytest.raises(UserError, match=r"^train.init_weights: .* is another model than train.\* builds"):
        start_from(wider, saved)
    with pytest.raises(UserError, match="not found"):
        start_from(second, str(tmp_path / "none.keras"))
