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
        return keras.Sequential(name="augment")
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


def build_small_cnn(image_size: int, n_classes: int, *, filters: int = 16, dense_units: int = 64,
                    dropout: float = 0.3, augment_strength: float = 0.1, seed: int = 0):
    """Four conv blocks with GroupNormalization, then average+max pooling and a dense head.

    GroupNormalization, not BatchNormalization: with short training, BatchNormalization's moving
    statistics lag the fast-moving weights and inference-mode predictions collapse to one class
    (seen with Keras 3.15 on real slices, both backends). GroupNormalization has no moving state,
    so training and inference compute the same function. Max pooling keeps a tiny, dense stone
    visible that average pooling would wash out.
    """
    import keras
    from keras import layers

    inputs = keras.Input((image_size, image_size, 1), name="slice")
    x = layers.Rescaling(1.0 / 255.0)(inputs)
    x = augmentation(augment_strength, seed)(x)
    width = filters
    for block in range(4):
        x = layers.Conv2D(width, 3, padding="same", use_bias=False, name=f"conv{block}")(x)
        x = layers.GroupNormalization(groups=min(8, width // 2), name=f"norm{block}")(x)
        x = layers.Activation("relu")(x)
        x = layers.MaxPooling2D()(x) if block < 3 else x
        width *= 2
    features = layers.Concatenate()([layers.GlobalAveragePooling2D()(x), layers.GlobalMaxPooling2D()(x)])
    x = layers.Dropout(dropout, seed=seed)(features)
    x = layers.Dense(dense_units, activation="relu")(x)
    x = layers.Dropout(dropout, seed=seed + 1)(x)
    outputs = layers.Dense(n_classes, activation="softmax", dtype="float32", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="small_cnn")


def build_model(architecture: str, image_size: int, n_classes: int, **kwargs):
    if architecture == "small_cnn":
        return build_small_cnn(image_size, n_classes, **kwargs)
    raise ValueError(f"unknown architecture '{architecture}' (known: {', '.join(ARCHITECTURES)})")
