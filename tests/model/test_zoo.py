"""Keras Applications backbones: greyscale input, two-phase fine-tuning, non-constant predictions,
and .keras round trips, at a tiny size (32 px) so that CPU CI can afford all five."""

from __future__ import annotations

import numpy as np
import pytest

from helpers.params import section
from helpers.paths import REPO
from tumorscope.config import TrainConfig
from tumorscope.inference import predict_proba
from tumorscope.models.architectures import APPLICATIONS
from tumorscope.models.train import batch_norm_layers, recalibrate_batch_norm, train_model
from tumorscope.models.zoo import backbone_of, build_model, set_trainable_top

pytestmark = pytest.mark.slow
SIZE = 32


@pytest.fixture(scope="module")
def tiny_data():
    """Four classes told apart by a bright square's position: learnable in a few epochs."""
    rng = np.random.default_rng(0)
    labels = np.arange(96, dtype=np.int32) % 4
    images = rng.integers(0, 60, (96, SIZE, SIZE, 1)).astype(np.uint8)
    for i, label in enumerate(labels):
        row, col = divmod(int(label), 2)
        images[i, row * 16 + 4:row * 16 + 12, col * 16 + 4:col * 16 + 12] = 230
    return (images[:64], labels[:64]), (images[64:], labels[64:])


def _weights(layer) -> list[np.ndarray]:
    return [np.array(w) for w in layer.get_weights()]


@pytest.mark.parametrize("architecture", list(APPLICATIONS))
def test_two_phase_training_gives_non_constant_predictions_and_round_trips(architecture, tiny_data, tmp_path):
    import keras

    (x_train, y_train), (x_val, y_val) = tiny_data
    keras.utils.set_random_seed(0)
    model = build_model(architecture, SIZE, 4, dense_units=32, augment_strength=0.0, seed=0)
    assert model.input_shape == (None, SIZE, SIZE, 1)  # greyscale in, replicated to RGB inside
    backbone_before = _weights(backbone_of(model))
    head_before = _weights(model.get_layer("probabilities"))

    # Phase 1 freezes the backbone; phase 2 unfreezes it all.
    # VGG has no normalisation: from scratch at 1e-3 it collapsed to one class (measured), at 1e-4
    # it learned this task; the others learn at 1e-3.
    lr = 1e-4 if architecture in ("vgg16", "vgg19") else 1e-3
    cfg = section(TrainConfig, architecture=architecture, head_epochs=1, epochs=7, batch_size=16, lr=lr,
                      fine_tune_lr=lr, unfreeze_top_n=-1, patience=10)
    set_trainable_top(model, 0)
    assert not any(layer.trainable for layer in backbone_of(model).layers)
    result = train_model(model, (x_train, y_train), (x_val, y_val), cfg, seed=0)
    assert result.epochs_run == 8  # one head epoch + seven fine-tuning epochs (no early stop)
    assert not all(np.allclose(a, b) for a, b in zip(head_before, _weights(model.get_layer("probabilities")), strict=True))
    backbone_after = _weights(backbone_of(model))
    assert not all(np.allclose(a, b) for a, b in zip(backbone_before, backbone_after, strict=True))  # phase 2 moved it

    predicted = predict_proba(result.model, x_val).argmax(axis=1)
    assert len(np.unique(predicted)) >= 2, f"{architecture}: every prediction is class {predicted[0]}"

    path = tmp_path / f"{architecture}.keras"
    result.model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(predict_proba(loaded, x_val), predict_proba(result.model, x_val), atol=1e-5)


def test_unfreeze_top_n_keeps_batch_norm_frozen():
    model = build_model("mobilenet_v2", SIZE, 4, seed=0)
    trainable = set_trainable_top(model, 12)
    layers = backbone_of(model).layers
    assert 0 < trainable <= 12
    assert not any(layer.trainable for layer in layers[:-12])
    assert not any(layer.trainable for layer in batch_norm_layers(backbone_of(model)))
    assert set_trainable_top(model, -1) == len(layers)


def test_recalibration_makes_moving_statistics_match_the_data():
    import keras

    model = build_model("small_cnn", SIZE, 4, norm="batch", augment_strength=0.0, seed=0)
    images = np.full((64, SIZE, SIZE, 1), 200, dtype=np.uint8)
    first_bn = batch_norm_layers(model)[0]
    assert np.allclose(np.array(first_bn.moving_mean), 0.0)  # fresh layer: statistics of nothing
    assert recalibrate_batch_norm(model, images, batch_size=16) == 4
    conv = model.get_layer("conv0")
    expected = np.asarray(conv(keras.ops.convert_to_tensor(np.full((1, SIZE, SIZE, 1), 200 / 255.0, "float32"))))
    # Every batch is the same constant image: the moving mean is its conv output averaged over pixels.
    np.testing.assert_allclose(np.array(first_bn.moving_mean), expected[0].mean(axis=(0, 1)), rtol=1e-3, atol=1e-4)
    assert first_bn.momentum == 0.9  # restored after recalibration


def test_missing_weights_file_is_a_user_error():
    from tumorscope.errors import UserError
    from tumorscope.models.zoo import model_options

    with pytest.raises(UserError, match="train.weights: weights file not found: /no/such.h5"):
        model_options(section(TrainConfig, architecture="resnet50", weights="/no/such.h5"), seed=0)


def test_too_small_input_is_rejected():
    with pytest.raises(ValueError, match="image_size >= 32"):
        build_model("vgg19", 16, 4)


def test_imagenet_weights_download_or_one_line_naming_the_setting(tmp_path):
    """``train.weights: imagenet`` downloads through Keras where there is internet; offline (CI,
    hospital servers) it is one line naming the setting and the local-file alternative. An empty
    KERAS_HOME, so that weights downloaded earlier on this machine cannot hide the offline path."""
    import os
    import subprocess
    import sys

    code = """
from helpers.params import section  # tests/ is on the child's PYTHONPATH
from tumorscope.config import TrainConfig
from tumorscope.errors import UserError
from tumorscope.models.zoo import build_configured
try:
    model = build_configured(section(TrainConfig, architecture="mobilenet_v2", weights="imagenet"), 64, 4, seed=0)
    print("BUILT", model.get_layer("backbone").count_params())
except UserError as err:
    print("USER_ERROR", err)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, KERAS_HOME=str(tmp_path / "keras-home"), PYTHONPATH=str(REPO / "tests")))
    lines = [line for line in done.stdout.splitlines() if line.startswith(("BUILT", "USER_ERROR"))]
    assert len(lines) == 1, done.stdout[-2000:] + done.stderr[-2000:]
    if lines[0].startswith("BUILT"):  # a machine with internet: the real backbone
        assert int(lines[0].split()[1]) > 2_000_000
    else:
        assert lines[0].startswith("USER_ERROR train.weights: imagenet: the mobilenet_v2 ImageNet weights could "
                                   "not be downloaded")
        assert lines[0].endswith("set train.weights to its local path")


def test_a_local_weights_file_is_loaded_into_the_backbone(tmp_path):
    """The offline path to pretrained weights: a local file, loaded as is (nothing downloaded)."""
    import keras

    from tumorscope.config import TrainConfig
    from tumorscope.models.zoo import backbone_of, build_configured

    keras.utils.set_random_seed(7)
    donor = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(64, 64, 3))
    path = tmp_path / "mobilenet_v2_notop.weights.h5"
    donor.save_weights(path)
    keras.utils.set_random_seed(8)  # a different initialisation: equality below comes from the file
    model = build_configured(section(TrainConfig, architecture="mobilenet_v2", weights=str(path)), 64, 4, seed=0)
    loaded = backbone_of(model).get_weights()
    assert len(loaded) == len(donor.get_weights())
    assert all(np.array_equal(a, b) for a, b in zip(loaded, donor.get_weights(), strict=True))
