"""Train a classifier from the memory-mapped cache."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tumorscope.config import TrainConfig


def balanced_class_weights(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """n / (k * count_c), as scikit-learn's 'balanced'; classes absent from labels get weight 0."""
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    weights = np.zeros(n_classes)
    present = counts > 0
    weights[present] = len(labels) / (present.sum() * counts[present])
    return weights


def make_batches(images, labels, batch_size: int, *, shuffle: bool, seed: int, class_weights=None):
    """A keras PyDataset over (possibly memory-mapped) arrays; yields (x, y[, sample_weight])."""
    import keras

    class ArrayBatches(keras.utils.PyDataset):
        def __init__(self):
            super().__init__()
            self.rng = np.random.default_rng(seed)
            self.order = np.arange(len(labels))
            if shuffle:
                self.rng.shuffle(self.order)

        def __len__(self):
            return math.ceil(len(labels) / batch_size)

        def __getitem__(self, index):
            # Sorted indices turn the memory-map gather into forward reads of the page cache.
            picked = np.sort(self.order[index * batch_size:(index + 1) * batch_size])
            x = np.asarray(images[picked], dtype=np.uint8)
            y = labels[picked]
            if class_weights is None:
                return x, y
            return x, y, class_weights[y].astype(np.float32)

        def on_epoch_end(self):
            if shuffle:
                self.rng.shuffle(self.order)

    return ArrayBatches()


@dataclass
class TrainResult:
    model: object
    history: dict
    epochs_run: int
    fit_seconds: float
    images_per_second: float


def train_model(model, train_data, val_data, cfg: TrainConfig, seed: int, callbacks=()) -> TrainResult:
    """Compile and fit with class weights, early stopping on val loss (best weights restored)."""
    import keras

    x_train, y_train = train_data
    n_classes = model.output_shape[-1]
    weights = balanced_class_weights(y_train, n_classes) if cfg.class_weights else None
    model.compile(optimizer=keras.optimizers.Adam(cfg.lr), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    stop = keras.callbacks.EarlyStopping(monitor="val_loss", patience=cfg.patience, restore_best_weights=True)
    shrink = keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=max(1, cfg.patience // 2))
    started = time.perf_counter()
    history = model.fit(
        make_batches(x_train, y_train, cfg.batch_size, shuffle=True, seed=seed, class_weights=weights),
        validation_data=make_batches(*val_data, cfg.batch_size, shuffle=False, seed=seed),
        epochs=cfg.epochs, callbacks=[stop, shrink, *callbacks], verbose=2,
    )
    seconds = time.perf_counter() - started
    epochs_run = len(history.history["loss"])
    return TrainResult(model, {k: [float(v) for v in vals] for k, vals in history.history.items()},
                       epochs_run, seconds, epochs_run * len(y_train) / seconds)


def predict_proba(model, images, batch_size: int = 256) -> np.ndarray:
    """Inference-mode class probabilities, batch by batch from a (memory-mapped) array."""
    outputs = [model.predict_on_batch(np.asarray(images[i:i + batch_size], dtype=np.uint8))
               for i in range(0, len(images), batch_size)]
    return np.concatenate([np.asarray(o) for o in outputs]) if outputs else np.empty((0, model.output_shape[-1]))


def save_model(model, model_dir: Path) -> Path:
    model_dir.mkdir(parents=True, exist_ok=True)
    path = model_dir / "model.keras"
    model.save(path)
    return path
