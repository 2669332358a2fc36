"""Linear probes: a frozen pretrained backbone's pooled features, a multinomial logistic regression on
them, written into the model's softmax layer so that the result is an ordinary Keras model (saved,
served, explained and calibrated like any other).

The regression is fitted on standardised features (scikit-learn, L2, balanced class weights with
``train.class_weights``), then folded back: softmax((f - mean) / sd @ W + b) is softmax(f @ W' + b')
with W' = W / sd and b' = b - (mean / sd) @ W, exactly the Dense layer's weights.
"""

from __future__ import annotations

import numpy as np

# A class absent from the training slices gets this logit bias: never predicted, still a column.
_ABSENT_BIAS = -30.0


def feature_model(model):
    """The model up to its pooled backbone features (the layer ``pool`` of ``zoo.build_application``)."""
    import keras

    return keras.Model(model.inputs, model.get_layer("pool").output, name="features")


def features_of(model, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Pooled features of uint8 slices (N, H, W, 1), float32, in batches (memory-mapped input is fine)."""
    extractor = feature_model(model)
    parts = [np.asarray(extractor(np.asarray(images[start:start + batch_size]), training=False), dtype=np.float32)
             for start in range(0, len(images), batch_size)]
    return np.concatenate(parts) if parts else np.zeros((0, extractor.output_shape[-1]), np.float32)


def fit_probe(features: np.ndarray, labels: np.ndarray, n_classes: int, c: float, balanced: bool,
              seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(kernel (D, n_classes), bias (n_classes,)) of an L2 multinomial logistic regression on
    standardised features, folded into raw-feature weights."""
    from sklearn.linear_model import LogisticRegression

    mean = features.mean(axis=0)
    sd = features.std(axis=0) + 1e-6
    present = np.unique(labels)
    kernel = np.zeros((features.shape[1], n_classes), np.float32)
    bias = np.full(n_classes, _ABSENT_BIAS, np.float32)
    if len(present) == 1:  # nothing to separate: the one class always
        bias[present[0]] = 0.0
        return kernel, bias
    regression = LogisticRegression(C=c, max_iter=3000, class_weight="balanced" if balanced else None,
                                     random_state=seed)
    regression.fit((features - mean) / sd, labels)
    coef = regression.coef_ if len(present) > 2 else np.vstack([-regression.coef_, regression.coef_]) / 2
    intercept = regression.intercept_ if len(present) > 2 else np.array([-1, 1]) * regression.intercept_[0] / 2
    kernel[:, present] = (coef / sd).T
    bias[present] = intercept - (coef * (mean / sd)).sum(axis=1)
    return kernel, bias


def probe_probabilities(features: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Softmax of the folded probe: what the model's softmax layer computes from these features."""
    logits = features @ kernel + bias
    logits -= logits.max(axis=1, keepdims=True)
    exp = np.exp(logits)
    return (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)


def log_loss(probabilities: np.ndarray, labels: np.ndarray) -> float:
    return float(-np.mean(np.log(np.clip(probabilities[np.arange(len(labels)), labels], 1e-7, 1.0))))


def choose_probe(train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray], n_classes: int,
                 cfg, seed: int) -> dict:
    """Fit one probe per ``cfg.probe_c`` on the training features and keep the one with the lowest
    validation log-loss: {kernel, bias, c, history} (history: per C, train and validation loss)."""
    (f_train, y_train), (f_val, y_val) = train, val
    best: dict | None = None
    history: dict[str, list[float]] = {"probe_c": [], "loss": [], "val_loss": []}
    for c in cfg.probe_c:
        kernel, bias = fit_probe(f_train, y_train, n_classes, c, cfg.class_weights, seed)
        val_loss = log_loss(probe_probabilities(f_val, kernel, bias), y_val) if len(y_val) else 0.0
        history["probe_c"].append(float(c))
        history["loss"].append(log_loss(probe_probabilities(f_train, kernel, bias), y_train))
        history["val_loss"].append(val_loss)
        if best is None or val_loss < best["val_loss"]:
            best = {"kernel": kernel, "bias": bias, "c": float(c), "val_loss": val_loss}
    assert best is not None  # probe_c has at least one value (config)
    return best | {"history": history}


def train_probe(model, train_data, val_data, cfg, seed: int) -> dict[str, list[float]]:
    """``train.fit: linear_probe``: features of the training and validation slices through the frozen
    backbone, the chosen probe written into the softmax layer. Returns the history (loss and
    validation loss per C tried)."""
    (x_train, y_train), (x_val, y_val) = train_data, val_data
    chosen = choose_probe((features_of(model, x_train), y_train), (features_of(model, x_val), y_val),
                          model.output_shape[-1], cfg, seed)
    model.get_layer("probabilities").set_weights([chosen["kernel"], chosen["bias"]])
    return chosen["history"]
