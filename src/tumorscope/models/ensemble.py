"""Several trained classifiers as one Keras model: what the train stage saves with
``train.ensemble_members`` > 1, and the rule ``tumorscope ablate`` measures its ensembles by.

The members' logits are averaged (their probabilities' geometric mean, renormalised). That rule
keeps the ensemble an ordinary classifier: the members' bodies side by side on one input, their
penultimate features concatenated, and one softmax Dense whose kernel is the members' final
kernels stacked and divided by their number. So everything that reads a model (the trust layer's
embeddings from the final layer's input, Grad-CAM's logits, the service, MLflow and BentoML) takes
it as it takes one model, and no custom layer has to be importable where it is loaded.
"""

from __future__ import annotations

from typing import Any

import numpy as np

MEMBER_PREFIX = "member_"
# Probabilities below this are taken as this before their logarithm: a float32 softmax can round
# to an exact 0, whose log would make every other member's vote irrelevant.
MIN_PROBABILITY = 1e-12


def final_softmax_dense(model: Any) -> Any:
    """The model's last layer if it is a softmax Dense on one input tensor, else a ValueError."""
    import keras

    last = model.layers[-1]
    if not (isinstance(last, keras.layers.Dense) and last.activation is keras.activations.softmax):
        raise ValueError(f"ensemble: member {model.name!r} does not end in a softmax Dense layer "
                         f"(its last layer is {last.name!r})")
    return last


def combine(members: list[Any], name: str = "ensemble") -> Any:
    """One classifier whose logits are the mean of the members' logits.

    The members are Keras classifiers with one input of one shape and a final softmax Dense over
    the same number of classes (the models of ``models.zoo``, linear probes included: their
    logistic regression is folded into that layer). Their weights are shared, not copied."""
    import keras

    if len(members) < 2:
        raise ValueError(f"ensemble: needs at least two members, got {len(members)}")
    shapes = {tuple(m.input_shape[1:]) for m in members}
    denses = [final_softmax_dense(m) for m in members]
    classes = {d.units for d in denses}
    if len(shapes) != 1 or len(classes) != 1:
        raise ValueError(f"ensemble: members must share the input shape and the classes, got inputs {sorted(shapes)} "
                         f"and {sorted(classes)} classes")
    inputs = keras.Input(shape=members[0].input_shape[1:], dtype=members[0].inputs[0].dtype, name="image")
    bodies = [keras.Model(m.inputs, d.input, name=f"{MEMBER_PREFIX}{i}") for i, (m, d) in enumerate(zip(members, denses, strict=False))]
    features = keras.layers.Concatenate(name="member_features")([body(inputs) for body in bodies])
    head = keras.layers.Dense(classes.pop(), activation="softmax", dtype="float32", name="probabilities")
    outputs = head(features)
    kernel = np.concatenate([np.asarray(d.kernel) for d in denses], axis=0) / len(members)
    bias = np.mean([np.asarray(d.bias) if d.use_bias else np.zeros(d.units) for d in denses], axis=0)
    head.set_weights([kernel.astype(np.float32), bias.astype(np.float32)])
    return keras.Model(inputs, outputs, name=name)


def member_bodies(model: Any) -> list[Any] | None:
    """The members' bodies of a model built by ``combine`` (saved and loaded or not), None for any
    other model: a final softmax Dense fed by a Concatenate of nested models on the model's input."""
    import keras

    last = model.layers[-1]
    if not (isinstance(last, keras.layers.Dense) and last.activation is keras.activations.softmax):
        return None
    if not last._inbound_nodes:
        return None
    concat = _producer(last._inbound_nodes[0].input_tensors[0])
    if not isinstance(concat, keras.layers.Concatenate):
        return None
    bodies = [_producer(t) for t in concat._inbound_nodes[0].input_tensors]
    if not all(isinstance(b, keras.Model) and b.name.startswith(MEMBER_PREFIX) for b in bodies):
        return None
    return bodies


def _producer(tensor: Any) -> Any:
    history = getattr(tensor, "_keras_history", None)
    return history.operation if history is not None else None


def mean_logit_probabilities(probabilities: list[np.ndarray]) -> np.ndarray:
    """The ensemble's probabilities from its members' (N, C) probabilities: softmax of the mean
    log-probability, which is the softmax of the mean logit (a row's constant cancels). NaN rows
    (a slice a member did not score) stay NaN."""
    logs = np.log(np.clip(np.asarray(probabilities, dtype=np.float64), MIN_PROBABILITY, None))
    mean = logs.mean(axis=0)
    mean = mean - np.max(mean, axis=1, keepdims=True)
    weights = np.exp(mean)
    return weights / weights.sum(axis=1, keepdims=True)
