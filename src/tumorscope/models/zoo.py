"""Model architectures, backend-agnostic Keras 3 (keras and keras.ops only: runs on TF and JAX).

Inputs are uint8 greyscale slices (H, W, 1) straight from the cache; scaling and augmentation are
layers inside the model, so the service feeds the same bytes the training saw, and augmentation
is active only in training mode.
"""

from __future__ import annotations

ARCHITECTURES = ("small_cnn",)


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
        # fast-moving weights in short training, or predict() collapses to one class (DESIGN.md).
        return layers.BatchNormalization(momentum=0.9, name=name)
    return layers.Identity(name=name)


def build_small_cnn(image_size: int, n_classes: int, *, filters: int = 16, dense_units: int = 64,
                    dropout: float = 0.3, augment_strength: float = 0.1, norm: str = "batch", seed: int = 0):
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


def build_model(architecture: str, image_size: int, n_classes: int, **kwargs):
    if architecture == "small_cnn":
        return build_small_cnn(image_size, n_classes, **kwargs)
    raise ValueError(f"unknown architecture '{architecture}' (known: {', '.join(ARCHITECTURES)})")
