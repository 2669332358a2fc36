"""Train a classifier from the memory-mapped cache."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tumorscope.config import TrainConfig
from tumorscope.data.augment import loader_threads
from tumorscope.models.devices import accelerator, data_parallel, data_parallel_devices, device_batch_size, fresh_session, set_precision


def balanced_class_weights(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """n / (k * count_c), as scikit-learn's 'balanced'; classes absent from labels get weight 0."""
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    weights = np.zeros(n_classes)
    present = counts > 0
    weights[present] = len(labels) / (present.sum() * counts[present])
    return weights


def balanced_order(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One epoch of ``len(labels)`` indices in which every class present is drawn equally often (with
    replacement within a class): class-balanced batches instead of class weights."""
    classes = np.unique(labels)
    per_class = -(-len(labels) // len(classes))  # ceil
    drawn = np.concatenate([rng.choice(np.flatnonzero(labels == c), per_class) for c in classes])
    return rng.permutation(drawn)[:len(labels)]


def make_batches(images, labels, batch_size: int, *, shuffle: bool, seed: int, class_weights=None,
                 augment_strength: float = 0.0, intensity_strength: float = 0.0, export_strength: float = 0.0,
                 balanced: bool = False, multiple: int = 1, workers: int = 1):
    """A keras PyDataset over (possibly memory-mapped) arrays; yields (x, y[, sample_weight]).

    A batch is a pure function of (epoch, index): the epoch's sample order is drawn from
    (seed, epoch) (class-balanced with ``balanced``), and with ``augment_strength`` > 0 the batch is
    warped on the host (`tumorscope.data.augment`; ``intensity_strength`` > 0 also changes its
    intensities; ``export_strength`` > 0 first gives each slice another export's look,
    `augment.randomise_export`) with a generator seeded by (seed, epoch, index). Reading a batch
    changes nothing. The epoch is set by the callback ``epoch_callback()`` from Keras's
    ``on_epoch_begin`` (pass it to ``fit``), not advanced in ``on_epoch_end``: Keras opens an
    iterator for the next epoch, and TensorFlow's prefetch thread starts reading it, *before* it
    calls ``on_epoch_end`` (and then discards it), and it probes batches 0 and 1 for the output
    signature, so a counter advanced by reads or by ``on_epoch_end`` would let thread timing decide
    which order and warps a batch got. Pass ``shuffle=False`` to ``fit``: this dataset shuffles
    itself, seeded; Keras would shuffle batch indices with Python's global ``random``.

    ``multiple`` > 1 (data-parallel training over that many devices, ``batch_size`` a multiple of
    it): every batch's size is a multiple of it, so each epoch leaves out the last
    ``len(labels) % multiple`` slices of its order (drawn anew each epoch when shuffled).
    ``workers`` threads augment parts of each batch at once (the same pixels for any number)."""
    import keras

    from tumorscope.data.augment import augment_batch, augment_intensity, randomise_export

    class ArrayBatches(keras.utils.PyDataset):
        def __init__(self):
            super().__init__()
            self.epoch = 0
            self.orders: dict[int, np.ndarray] = {}

        usable = len(labels) - len(labels) % multiple

        def __len__(self):
            return math.ceil(self.usable / batch_size)

        def order_of(self, epoch: int) -> np.ndarray:
            if epoch not in self.orders:
                rng = np.random.default_rng([seed, epoch])
                order: np.ndarray = (balanced_order(np.asarray(labels), rng) if balanced
                                     else rng.permutation(len(labels)) if shuffle else np.arange(len(labels)))
                self.orders = {e: o for e, o in self.orders.items() if e >= epoch - 1} | {epoch: order}
            return self.orders[epoch]

        def __getitem__(self, index):
            epoch = self.epoch
            # Sorted indices turn the memory-map gather into forward reads of the page cache.
            picked = np.sort(self.order_of(epoch)[:self.usable][index * batch_size:(index + 1) * batch_size])
            x = np.asarray(images[picked], dtype=np.uint8)
            if augment_strength > 0 or intensity_strength > 0 or export_strength > 0:
                rng = np.random.default_rng([seed, epoch, index])
                x = randomise_export(x, export_strength, rng, workers)
                x = augment_intensity(augment_batch(x, augment_strength, rng, workers), intensity_strength, rng, workers)
            y = labels[picked]
            if class_weights is None:
                return x, y
            return x, y, class_weights[y].astype(np.float32)

        def epoch_callback(self):
            """A Keras callback that sets this dataset's epoch as each epoch begins (before Keras
            opens the epoch's iterator); epochs count across fine-tuning phases (initial_epoch)."""
            batches = self

            class FollowEpoch(keras.callbacks.Callback):
                def on_epoch_begin(self, epoch, logs=None):
                    batches.epoch = int(epoch)

            return FollowEpoch()

    return ArrayBatches()


@dataclass
class TrainResult:
    model: object
    history: dict
    epochs_run: int
    fit_seconds: float
    images_per_second: float
    batch_size: int  # as trained: train.batch_size scaled for the device


def plateau_callbacks(cfg: TrainConfig) -> list:
    """Early stopping on ``cfg.monitor`` (best weights restored) and a learning-rate halving when
    it stalls, both ignoring the first ``cfg.warmup_epochs`` epochs (an early minimum of the
    validation loss must not be restored or shrink the learning rate before learning starts).
    The mode is explicit: Keras's "auto" would minimise any name without "acc" in it, macro-F1
    included."""
    import keras

    class WarmReduceLROnPlateau(keras.callbacks.ReduceLROnPlateau):
        def on_epoch_end(self, epoch, logs=None):
            if epoch >= cfg.warmup_epochs:
                super().on_epoch_end(epoch, logs)

    mode = "min" if cfg.monitor == "val_loss" else "max"
    return [keras.callbacks.EarlyStopping(monitor=cfg.monitor, mode=mode, patience=cfg.patience,
                                          restore_best_weights=True, start_from_epoch=cfg.warmup_epochs),
            WarmReduceLROnPlateau(monitor=cfg.monitor, mode=mode, factor=0.5, patience=max(1, cfg.patience // 2))]


def _fit_phase(model, train_batches, val_batches, lr: float, epochs: int, cfg: TrainConfig, scores, callbacks,
               initial_epoch: int, backed_up=None):
    """Compile at ``lr`` and fit up to ``epochs`` more epochs with early stopping on
    ``cfg.monitor`` (best weights restored) and a learning-rate halving on plateau; returns the
    Keras history dict of the epochs run. ``backed_up(plateau)`` gives a backup callback
    (``resume.TrainingBackup.callback``) that sees the plateau callbacks."""
    import keras

    model.compile(optimizer=keras.optimizers.Adam(lr), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy", *scores])
    plateau = plateau_callbacks(cfg)
    extra = [backed_up(plateau)] if backed_up is not None else []
    history = model.fit(train_batches, validation_data=val_batches, initial_epoch=initial_epoch, shuffle=False,
                        epochs=initial_epoch + epochs, verbose=2,
                        callbacks=[train_batches.epoch_callback(), *plateau, *callbacks, *extra])
    return extra[0].history if extra else history.history


def train_model(model, train_data, val_data, cfg: TrainConfig, seed: int, callbacks=(),
                critical_index: int | None = None, backup=None) -> TrainResult:
    """Fit with class weights; Keras Applications models in two phases (head, then top layers);
    with ``train.fit: linear_probe`` a logistic regression on frozen features (``models.probe``).
    Every epoch logs ``val_macro_f1`` (and ``val_critical_recall`` given ``critical_index``),
    scored in fit's own validation pass. With ``backup`` (a ``resume.TrainingBackup``) every
    epoch is backed up and a killed run called again continues after its last finished epoch,
    ending as an uninterrupted one would; the backup is removed when training ends."""
    from tumorscope.models.metrics import split_scores
    from tumorscope.models.zoo import backbone_of, set_trainable_top

    if cfg.fit == "linear_probe":
        from tumorscope.models.probe import train_probe

        started = time.perf_counter()
        probe_history = train_probe(model, train_data, val_data, cfg, seed)
        seconds = time.perf_counter() - started
        # One pass of the backbone over the slices: an "epoch" in the records' terms.
        return TrainResult(model, probe_history, 1, seconds, len(train_data[1]) / max(seconds, 1e-9), cfg.batch_size)
    x_train, y_train = train_data
    n_classes = model.output_shape[-1]
    # Balanced batches already give every class the same weight: class weights on top would count twice.
    weights = balanced_class_weights(y_train, n_classes) if cfg.class_weights and not cfg.balanced_batches else None
    devices = data_parallel_devices()
    # The global batch is split evenly across the devices of a data-parallel fit.
    batch_size = math.ceil(device_batch_size(cfg.batch_size, cfg.gpu_batch_multiplier, accelerator()) / devices) * devices
    loader_augment = cfg.augment_strength_in("loader")
    train_batches = make_batches(x_train, y_train, batch_size, shuffle=True, seed=seed, class_weights=weights,
                                 augment_strength=loader_augment, intensity_strength=cfg.intensity_augment,
                                 export_strength=cfg.export_augment, balanced=cfg.balanced_batches, multiple=devices,
                                 workers=loader_threads(cfg.loader_workers))
    x_val, y_val = val_data
    val_batches = make_batches(x_val, y_val, batch_size, shuffle=False, seed=seed, multiple=devices)
    phases: list[tuple[float, int, int | None]] = []  # (lr, epochs, trainable top layers or None: leave as is)
    if backbone_of(model) is not None:
        if cfg.head_epochs > 0:
            phases.append((cfg.lr, cfg.head_epochs, 0))
        phases.append((cfg.fine_tune_lr if cfg.head_epochs > 0 else cfg.lr, cfg.epochs, cfg.unfreeze_top_n))
    else:
        phases.append((cfg.lr, cfg.epochs, None))

    history: dict[str, list[float]] = {}
    state = backup.state() if backup is not None else None
    started = time.perf_counter()
    for phase, (lr, epochs, top) in enumerate(phases):
        if top is not None:
            set_trainable_top(model, top)
        if state is not None and (state["phase"] > phase or state["phase_finished"] and state["phase"] == phase):
            continue  # finished before the kill: its weights are restored below or by the next phase's backup
        if state is not None and state["phase"] == phase - 1 and state["phase_finished"]:
            backup.restore_variables(model, with_optimizer=False)  # a phase starting afresh, after the last one's end
            history, state = state["history"], None
        done = len(history.get("loss", []))
        scores = split_scores(n_classes, critical_index)
        resume, state = (state, None) if state is not None and state["phase"] == phase else (None, state)
        backed_up = (lambda plateau, phase=phase, before=history, resume=resume:
                     backup.callback(phase, before, plateau, resume)) if backup is not None else None
        fitted = _fit_phase(model, train_batches, val_batches, lr, epochs, cfg, scores, callbacks, done, backed_up)
        if backup is not None:
            history = fitted  # the whole history so far (the epochs before a kill included)
        else:
            for key, values in fitted.items():
                history.setdefault(key, []).extend(float(v) for v in values)
    if state is not None:  # every phase had finished before the kill
        backup.restore_variables(model, with_optimizer=False)
        history = state["history"]
    if backup is not None:
        backup.clear()
    # Early stopping restored the best epoch's weights; give BatchNormalization statistics that
    # match them (a no-op for models without trainable BatchNormalization, e.g. the default CNN).
    recalibrate_batch_norm(model, x_train, batch_size, seed=seed, augment_strength=loader_augment)
    seconds = time.perf_counter() - started
    epochs_run = len(history["loss"])
    return TrainResult(model, history, epochs_run, seconds, epochs_run * len(y_train) / seconds, batch_size)


def batch_norm_layers(model) -> list:
    """Every BatchNormalization layer, nested models (Applications backbones) included."""
    import keras

    found = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            found.append(layer)
        elif isinstance(layer, keras.Model):
            found.extend(batch_norm_layers(layer))
    return found


def recalibrate_batch_norm(model, images, batch_size: int = 32, max_batches: int = 64, seed: int = 0,
                           augment_strength: float = 0.0) -> int:
    """Re-estimate BatchNormalization moving statistics for the final weights ("precise BN").

    During training the moving averages trail weights that keep changing, so inference-mode
    predictions can differ wildly from training-mode ones (even collapse to one class). Passing
    training data through the model in training mode with momentum i/(i+1) on batch i makes each
    moving statistic the plain average over those batches, computed with the final weights. No
    weight is trained (no optimizer step). The batches are augmented as in training (in the model,
    or here with ``augment_strength`` when the loader augments), the distribution the statistics
    saw. Returns the number of batches used.
    """
    from tumorscope.data.augment import augment_batch

    layers = [layer for layer in batch_norm_layers(model) if layer.trainable]
    if not layers:
        return 0
    saved = [layer.momentum for layer in layers]
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(images))
    used = 0
    try:
        for used, start in enumerate(range(0, min(len(images), batch_size * max_batches), batch_size)):
            for layer in layers:
                layer.momentum = used / (used + 1.0)
            batch = np.asarray(images[np.sort(order[start:start + batch_size])], dtype=np.uint8)
            model(augment_batch(batch, augment_strength, rng), training=True)
    finally:
        for layer, momentum in zip(layers, saved, strict=True):
            layer.momentum = momentum
    return used + 1


@dataclass
class FitOutcome:
    result: TrainResult
    precision: str  # the Keras dtype policy it trained under
    probabilities: np.ndarray  # inference-mode, on the scored slices
    scores: dict  # tumorscope.models.evaluate.score_predictions on the scored slices


def start_from(model, path: str) -> None:
    """Give ``model`` the weights of the ``.keras`` model at ``path`` (fine-tuning instead of a
    fresh start); one line naming train.init_weights when the file is missing or another model."""
    import keras

    from tumorscope.errors import UserError

    if not Path(path).is_file():
        raise UserError(f"train.init_weights: {path} not found")
    try:
        weights = keras.saving.load_model(path, compile=False).get_weights()
    except Exception as err:
        raise UserError(f"train.init_weights: {path} is not a Keras model file ({type(err).__name__})") from None
    shapes, expected = [w.shape for w in weights], [w.shape for w in model.get_weights()]
    if shapes != expected:
        raise UserError(f"train.init_weights: {path} is another model than train.* builds ({len(shapes)} weight arrays, "
                        f"{len(expected)} expected, or other shapes): start from a model of the same architecture, "
                        "settings, input size and classes")
    model.set_weights(weights)


def fit_and_score(cfg: TrainConfig, image_size: int, classes: list[str], seed: int, train_data, val_data,
                  scored, evaluate_cfg, callbacks=(), guard=None, backup=None, init_weights: str | None = None) -> FitOutcome:
    """Build -> train -> score: the one routine behind the train stage, every Optuna trial and every
    cross-validation fold, so that they cannot drift apart.

    ``train_data``/``val_data`` are (images, labels); ``scored`` is (images, labels, duplicate-group
    ids) of the slices to score (validation for the train stage and trials, the held-out fold for
    cross-validation). ``guard`` is a context manager held while the model trains (a Prefect
    concurrency slot); ``backup`` makes a killed fit resumable (``train_model``); ``init_weights``
    (the train stage's train.init_weights: trials and folds start fresh) fine-tunes a model. The Keras session
    is reset and seeded first, so a routine called in a loop gives each model the same start as a
    fresh process would.
    """
    import contextlib

    import keras

    from tumorscope.inference import predict_proba
    from tumorscope.models.evaluate import class_index, score_predictions
    from tumorscope.models.zoo import build_configured

    fresh_session()
    keras.utils.set_random_seed(seed)
    precision = set_precision(cfg.precision)
    # After fresh_session, which forgets any distribution set before it.
    distribution = data_parallel(cfg.distribution)
    with distribution.scope() if distribution is not None else contextlib.nullcontext():
        model = build_configured(cfg, image_size, len(classes), seed)
        if init_weights:
            start_from(model, init_weights)
        with guard if guard is not None else contextlib.nullcontext():
            result = train_model(model, train_data, val_data, cfg, seed, callbacks=callbacks,
                                 critical_index=class_index(classes, evaluate_cfg.critical_class), backup=backup)
    # Scored outside the distribution: every slice, in batches of any size (the weights are replicated).
    images, labels, groups = scored
    probabilities = predict_proba(result.model, images, test_time_augmentation=evaluate_cfg.test_time_augmentation)
    scores = score_predictions(labels, probabilities, groups, classes, evaluate_cfg, seed)
    return FitOutcome(result, precision, probabilities, scores)
