"""The validation macro-F1 / critical recall Keras metrics that early stopping and Optuna's
pruner read: they must equal the evaluation code's numpy scores over the whole split."""

from __future__ import annotations

import numpy as np
import pytest

from tumorscope.models.evaluate import confusion, macro_f1_from_confusion, per_class_scores


def one_hot_probabilities(predicted: np.ndarray, n_classes: int) -> np.ndarray:
    probabilities = np.full((len(predicted), n_classes), 0.1 / (n_classes - 1), dtype=np.float32)
    probabilities[np.arange(len(predicted)), predicted] = 0.9
    return probabilities


@pytest.mark.parametrize("absent_class", [None, 2])
def test_scores_accumulated_over_batches_equal_the_numpy_scores(absent_class):
    from tumorscope.models.metrics import split_scores

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 203)
    if absent_class is not None:
        labels[labels == absent_class] = 0  # the class never occurs in the truth, only in predictions
    predicted = np.where(rng.random(203) < 0.6, labels, rng.integers(0, 4, 203))
    macro_f1, tumour_recall = split_scores(4, critical_index=3)
    for start in range(0, 203, 32):  # uneven last batch, as fit's validation pass
        batch = slice(start, start + 32)
        for metric in (macro_f1, tumour_recall):
            metric.update_state(labels[batch], one_hot_probabilities(predicted[batch], 4))
    matrix = confusion(labels, predicted, 4)
    assert float(macro_f1.result()) == pytest.approx(macro_f1_from_confusion(matrix[None])[0], abs=1e-6)
    assert float(tumour_recall.result()) == pytest.approx(per_class_scores(matrix)["recall"][3], abs=1e-6)
    macro_f1.reset_state()
    assert float(macro_f1.result()) == 0.0


def test_without_the_critical_class_only_macro_f1_is_scored():
    from tumorscope.models.metrics import split_scores

    assert [m.name for m in split_scores(4, None)] == ["macro_f1"]
    assert [m.name for m in split_scores(4, 1)] == ["macro_f1", "critical_recall"]


def test_a_model_compiled_with_the_scores_evaluates_them_over_the_whole_split():
    from tumorscope.models.metrics import split_scores
    from tumorscope.models.zoo import build_model

    model = build_model("small_cnn", 32, 4, filters=4, dense_units=8, augment_strength=0.0)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=split_scores(4, 3))
    x = np.random.default_rng(1).integers(0, 255, (40, 32, 32, 1)).astype(np.uint8)
    y = np.arange(40) % 4
    model.fit(x, y, epochs=1, verbose=0)
    scores = model.evaluate(x, y, batch_size=16, verbose=0, return_dict=True)
    assert {"macro_f1", "critical_recall"} <= set(scores)
    expected = confusion(y, model.predict(x, verbose=0).argmax(axis=1), 4)
    assert scores["macro_f1"] == pytest.approx(macro_f1_from_confusion(expected[None])[0], abs=1e-6)


def test_the_saved_model_loads_with_plain_keras_in_a_fresh_process(tmp_path):
    """The artefact goes to MLflow and the Bento service: loading it must not need tumorscope's
    metric classes registered (the evaluate stage once failed on exactly that)."""
    import subprocess
    import sys

    from tumorscope.models.metrics import split_scores
    from tumorscope.models.saving import save_model
    from tumorscope.models.zoo import build_model

    model = build_model("small_cnn", 32, 4, filters=4, dense_units=8, augment_strength=0.0)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=split_scores(4, 3))
    x = np.random.default_rng(1).integers(0, 255, (40, 32, 32, 1)).astype(np.uint8)
    model.fit(x, np.arange(40) % 4, epochs=1, verbose=0)
    expected = model.predict(x, verbose=0)
    path = save_model(model, tmp_path)
    np.save(tmp_path / "x.npy", x)
    code = (f"import keras, numpy as np, sys; m = keras.saving.load_model({str(path)!r}); "
            f"np.save({str(tmp_path / 'p.npy')!r}, m.predict(np.load({str(tmp_path / 'x.npy')!r}), verbose=0)); "
            "assert 'tumorscope' not in sys.modules")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    np.testing.assert_allclose(np.load(tmp_path / "p.npy"), expected, atol=1e-5)


def test_a_saved_model_is_the_same_bytes_whenever_it_is_saved(tmp_path):
    """models/model.keras is a DVC output: saving the same weights later must not change a byte
    (Keras writes the save time into the zip), and the file must still load."""
    import time

    import keras

    from tumorscope.models.saving import save_model

    def build():  # built twice: the same weights in new Python objects (other shared-object ids)
        keras.backend.clear_session()  # layer names restart, as fit_and_score does before each model
        keras.utils.set_random_seed(0)
        built = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="relu"),
                                  keras.layers.Dense(2, activation="softmax")])
        built.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
        return built

    first = save_model(build(), tmp_path / "a").read_bytes()
    time.sleep(1.1)  # zip times have a 2 s resolution, Keras's date_saved 1 s
    model = build()
    second = save_model(model, tmp_path / "b").read_bytes()
    assert first == second
    loaded = keras.saving.load_model(tmp_path / "b" / "model.keras")
    x = np.ones((3, 4), dtype="float32")
    assert np.allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
