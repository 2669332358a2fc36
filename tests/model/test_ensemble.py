"""Several classifiers served as one (``train.ensemble_members``, ``models.ensemble``): the saved
model's answers are its members' mean logits, the rule ``ablate`` measures; it loads as a plain
Keras model, and the trust layer reads its features as it reads any model's."""

from __future__ import annotations

import numpy as np
import pytest

from helpers.params import section
from tumorscope.config import TrainConfig
from tumorscope.models.ensemble import combine, mean_logit_probabilities, member_bodies

SIZE = 32


def slices(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, 1)).astype(np.uint8)


@pytest.fixture(scope="module")
def members():
    from tumorscope.models.zoo import build_configured

    models = [build_configured(section(TrainConfig), SIZE, 4, seed=0), build_configured(section(TrainConfig, filters=8), SIZE, 4, seed=1)]
    # Members that disagree (a fresh init answers near-uniformly): the two mean rules then differ.
    for model, favoured in zip(models, (0, 3), strict=False):
        model.layers[-1].bias.assign(np.eye(4, dtype=np.float32)[favoured] * 3.0)
    return models


def test_the_ensemble_answers_with_its_members_mean_logits_and_survives_a_save(members, tmp_path):
    import keras

    from tumorscope.monitoring.features import feature_model

    images = slices(6)
    ensemble = combine(members)
    alone = [m.predict(images, verbose=0) for m in members]
    answers = ensemble.predict(images, verbose=0)
    np.testing.assert_allclose(answers, mean_logit_probabilities(alone), atol=1e-5)
    assert not np.allclose(answers, np.mean(alone, axis=0), atol=1e-4)  # not the arithmetic mean: the rule is told apart

    ensemble.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras")
    np.testing.assert_allclose(loaded.predict(images, verbose=0), answers, atol=1e-6)
    assert [b.name for b in member_bodies(loaded)] == ["member_0", "member_1"]
    assert member_bodies(members[0]) is None
    # The trust layer's embedding: the members' penultimate features side by side.
    probabilities, features = feature_model(loaded).predict(images, verbose=0)
    widths = [m.layers[-1].input.shape[-1] for m in members]
    assert features.shape == (6, sum(widths))
    np.testing.assert_allclose(probabilities, answers, atol=1e-6)


def test_members_that_do_not_fit_together_are_refused(members):
    import keras

    from tumorscope.models.zoo import build_configured

    with pytest.raises(ValueError, match="at least two members"):
        combine(members[:1])
    with pytest.raises(ValueError, match="share the input shape"):
        combine([members[0], build_configured(section(TrainConfig), 48, 4, seed=0)])
    with pytest.raises(ValueError, match="share the input shape and the classes"):
        combine([members[0], build_configured(section(TrainConfig), SIZE, 3, seed=0)])
    inputs = keras.Input((SIZE, SIZE, 1))
    logits = keras.layers.Dense(4)(keras.layers.Flatten()(inputs))
    no_softmax = keras.Model(inputs, keras.layers.Softmax()(logits), name="softmax_apart")
    with pytest.raises(ValueError, match="'softmax_apart' does not end in a softmax Dense"):
        combine([members[0], no_softmax])


def test_the_mean_logit_rule():
    a = np.array([[0.7, 0.2, 0.1], [0.5, 0.5, 0.0], [np.nan, np.nan, np.nan]])
    b = np.array([[0.1, 0.8, 0.1], [0.4, 0.4, 0.2], [0.3, 0.3, 0.4]])
    out = mean_logit_probabilities([a, b])
    expected = np.sqrt(a[0] * b[0]) / np.sqrt(a[0] * b[0]).sum()  # the renormalised geometric mean
    np.testing.assert_allclose(out[0], expected)
    assert np.isfinite(out[1]).all() and out[1].sum() == pytest.approx(1.0)  # an exact 0 does not veto a class
    assert out[1, 2] < 1e-5
    assert np.isnan(out[2]).all()  # a slice one member did not score stays unscored
    np.testing.assert_allclose(mean_logit_probabilities([b, b]), b)
