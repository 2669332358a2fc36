"""Grad-CAM explanations for the slice classifiers: a heat map, a PNG overlay and the hot region.

Grad-CAM (Selvaraju et al., 2017) weights the last convolutional feature map by the gradient of
the class score and keeps the positive part: "where in the slice the evidence for this class is".
It is a coarse map (the feature map of a 224 px slice is 7x7 for the Applications backbones), an
aid for a reader and for spotting a model that looks at the wrong thing, not a segmentation.

Backend-agnostic: Keras 3 has no generic gradient op, so the one gradient is taken with the
active backend's own autodiff (TensorFlow GradientTape, jax.grad, torch.autograd). Heavy imports
stay inside the functions, as elsewhere in this package.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

# Grad models per classifier. Building a Keras model from an intermediate tensor appends nodes to
# the layers after it (keras.src.models.functional.clone_graph_nodes), so building them on every
# call would grow the model's graph with every request a service explains. Weak keys: a
# classifier that is dropped takes its grad models with it.
_SPLITS: weakref.WeakKeyDictionary[Any, _Split | _EnsembleSplit] = weakref.WeakKeyDictionary()
_SPLITS_LOCK = threading.Lock()

# A region whose centroid is within this fraction of the image width of the vertical midline is "centre".
CENTRE_BAND = 0.10


@dataclass(frozen=True)
class _Split:
    """A classifier cut at its Grad-CAM target: ``features`` (models applied in turn) map a batch
    of slices to the feature map, ``head`` maps the feature map on to the class scores (logits
    when ``logits_layer`` is set, else probabilities)."""

    features: tuple[Any, ...]
    head: tuple[Any, ...]
    # The final softmax Dense, applied by hand without its softmax to get logits; None when the
    # model ends otherwise and the head's output (probabilities) is used instead.
    logits_layer: Any
    target: str

    def feature_map(self, batch: Any) -> Any:
        return _apply(self.features, batch)

    def scores(self, feature_map: Any) -> Any:
        import keras

        x = _apply(self.head, feature_map)
        dense = self.logits_layer
        if dense is None:
            return x
        logits = keras.ops.matmul(keras.ops.cast(x, dense.compute_dtype), dense.kernel)
        return keras.ops.add(logits, dense.bias) if dense.use_bias else logits

    def log_odds(self, feature_map: Any, class_index: int) -> Any:
        import keras

        scores = self.scores(feature_map)
        return _log_odds(scores if self.logits_layer is not None else keras.ops.log(keras.ops.maximum(scores, 1e-30)),
                         class_index)


@dataclass(frozen=True)
class _EnsembleSplit:
    """An ensemble of ``models.ensemble.combine`` cut at each member's Grad-CAM target: per member,
    ``features`` (input -> its feature map) and ``head`` (feature map -> its penultimate features);
    ``dense`` is the shared softmax layer over the concatenated features."""

    members: tuple[tuple[tuple[Any, ...], tuple[Any, ...]], ...]
    dense: Any

    def logits(self, penultimate: list[Any]) -> Any:
        import keras

        dense = self.dense
        joined = keras.ops.cast(keras.ops.concatenate(penultimate, axis=-1), dense.compute_dtype)
        return keras.ops.add(keras.ops.matmul(joined, dense.kernel), dense.bias)


def _apply(parts: tuple[Any, ...], x: Any) -> Any:
    for part in parts:
        x = part(x, training=False)
    return x


def _log_odds(logits: Any, class_index: int) -> Any:
    """log(p_c / (1 - p_c)) = z_c - logsumexp(z_j, j != c) of the first image in the batch."""
    import keras

    logits = keras.ops.cast(logits[0], "float32")
    others = keras.ops.concatenate([logits[:class_index], logits[class_index + 1:]])
    return logits[class_index] - keras.ops.logsumexp(others)


def grad_cam(model: Any, image: np.ndarray, class_index: int | None = None) -> np.ndarray:
    """Grad-CAM heat map of one slice: float32 (H, W) in [0, 1], the input image's size.

    ``model`` is a Keras 3 functional classifier whose input is a uint8-valued (H, W, 1) slice and
    whose output is softmax class probabilities (the models of ``tumorscope.models.zoo``, or
    such a model loaded from a .keras file). ``image`` is one slice, (H, W, 1) or (H, W).
    ``class_index`` None explains the predicted class.

    The target is the last layer with a 4-D (feature map) output, searching nested models too:
    a Keras Applications backbone sits in our models as one nested Model layer, and its last
    conv layer's tensor belongs to the backbone's own graph, not the classifier's (the classic
    nested-model pitfall: a grad model built from ``classifier.input`` to that tensor is
    "disconnected"). So the classifier is cut into a chain of models that only use tensors of
    their own graph: outer input -> nested model's input, nested input -> target, target ->
    nested output, nested output -> classifier output (see ``_build_chain``).

    The score differentiated is the class's log-odds, log(p_c / (1 - p_c)) = z_c - logsumexp of
    the other logits, with the logits z taken before the final softmax Dense's activation. Not
    p_c: probabilities saturate, and a confident model's gradient underflows to exact zeros, an
    empty map for the clearest cases. Not the raw logit z_c either (the paper's choice): a
    softmax's logits are defined only up to a constant shared by all classes, so z_c alone can
    rise or fall with evidence that leaves p_c unchanged. The log-odds is what the softmax
    decides on (z_1 - z_0 with two classes); its gradient is d log p_c / (1 - p_c), the
    probability's direction without the saturation. A model that does not end in a softmax
    Dense is differentiated through log(probabilities) instead.

    The map is ReLU(sum_k w_k A_k) with w_k the spatial mean of d score / d A_k, upsampled
    bilinearly to the image size and divided by its maximum. No positive evidence anywhere
    gives all zeros, not a map stretched out of rounding noise.

    Caveat, global max pooling (the small CNN): the gradient reaches only each channel's
    maximum, and the mean weights can let channels active everywhere with a negative weight
    outweigh the finding. Briefly trained on a synthetic blob task, 2 of 10 models with a
    16-unit head and no dropout gave empty or misplaced maps; with the train config's default
    head (64 units, dropout 0.3) none of 8 did (tests/model/test_explain.py).
    """
    import keras

    pixels = _as_slice(image)
    expected = tuple(model.input_shape[1:])
    if pixels.shape != expected:
        raise ValueError(f"grad_cam: image shape {pixels.shape} does not match the model input {expected} "
                         "(resize the slice as the training cache did)")
    split = _split_for(model)
    batch = keras.ops.convert_to_tensor(pixels[None].astype(np.float32))
    if isinstance(split, _EnsembleSplit):
        return _ensemble_grad_cam(split, batch, class_index, (pixels.shape[0], pixels.shape[1]))
    feature_map = split.feature_map(batch)
    scores = np.asarray(keras.ops.convert_to_numpy(split.scores(feature_map)))[0]
    class_index = _checked_class(scores, class_index)

    def score(features: Any) -> Any:
        return split.log_odds(features, class_index)

    cam = np.maximum(_weighted_activations(feature_map, _gradient(score, feature_map)), 0.0)
    return _heat_from_cam(cam, (pixels.shape[0], pixels.shape[1]))


def _checked_class(scores: np.ndarray, class_index: int | None) -> int:
    """``class_index``, or the predicted class when None (the logits' argmax is the probabilities')."""
    n_classes = scores.shape[-1]
    if n_classes < 2:
        raise ValueError("grad_cam: needs a classifier with at least two classes")
    class_index = int(np.argmax(scores)) if class_index is None else int(class_index)
    if not 0 <= class_index < n_classes:
        raise ValueError(f"grad_cam: class_index {class_index} is outside 0..{n_classes - 1}")
    return class_index


def _weighted_activations(feature_map: Any, grads: Any) -> np.ndarray:
    """sum_k w_k A_k of the first image, w_k the spatial mean of the gradient (no ReLU yet)."""
    import keras

    activations = np.asarray(keras.ops.convert_to_numpy(feature_map), dtype=np.float32)[0]
    weights = np.zeros(activations.shape[-1], np.float32) if grads is None else \
        np.asarray(keras.ops.convert_to_numpy(grads), dtype=np.float32)[0].mean(axis=(0, 1))
    return (activations * weights).sum(axis=-1)


def _ensemble_grad_cam(split: _EnsembleSplit, batch: Any, class_index: int | None, shape: tuple[int, int]) -> np.ndarray:
    """Grad-CAM of an ensemble: the ensemble's log-odds differentiated by each member's feature map
    in turn (the other members' features held at their values); the members' weighted maps,
    brought to the finest member's map size, are summed, and the sum is what a single model's map
    is (its positive part, upsampled). The logits are a sum over members, so the sum is each
    member's first-order share of the same score, in the same units."""
    import keras

    feature_maps = [_apply(features, batch) for features, _ in split.members]
    penultimate = [_apply(head, fm) for (_, head), fm in zip(split.members, feature_maps, strict=False)]
    scores = np.asarray(keras.ops.convert_to_numpy(split.logits(penultimate)))[0]
    class_index = _checked_class(scores, class_index)
    weighted = []
    for index, ((_, head), feature_map) in enumerate(zip(split.members, feature_maps, strict=False)):
        def score(features: Any, index: int = index, head: tuple[Any, ...] = head) -> Any:
            parts = [*penultimate[:index], _apply(head, features), *penultimate[index + 1:]]
            return _log_odds(split.logits(parts), class_index)

        weighted.append(_weighted_activations(feature_map, _gradient(score, feature_map)))
    finest = max((w.shape for w in weighted), key=lambda s: s[0] * s[1])
    return _heat_from_cam(np.maximum(sum(_resize(w, finest) for w in weighted), 0.0), shape)


def _gradient(score: Callable[[Any], Any], feature_map: Any) -> Any:
    """d score / d feature_map with the active backend's autodiff (None if disconnected)."""
    import keras

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            tape.watch(feature_map)
            value = score(feature_map)
        return tape.gradient(value, feature_map)
    if backend == "jax":
        import jax

        return jax.grad(score)(feature_map)
    if backend == "torch":
        import torch

        leaf = feature_map.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(score(leaf), leaf, allow_unused=True)
        return grad
    raise NotImplementedError(f"grad_cam: no gradient for the Keras backend {backend!r} (tensorflow, jax and torch have one)")


def _split_for(model: Any) -> _Split | _EnsembleSplit:
    """The classifier cut at its Grad-CAM target, built once per model (see ``_SPLITS``)."""
    with _SPLITS_LOCK:
        split = _SPLITS.get(model)
        if split is None:
            split = _SPLITS[model] = _build_split(model)
        return split


def _build_split(model: Any) -> _Split | _EnsembleSplit:
    import keras

    from tumorscope.models.ensemble import member_bodies

    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ValueError("grad_cam: needs a model with one input and one output")
    bodies = member_bodies(model)
    if bodies is not None:
        return _EnsembleSplit(tuple(_member_chain(body) for body in bodies), model.layers[-1])
    path = _target_path(model)
    if path is None:
        raise ValueError(f"grad_cam: model {model.name!r} has no layer with a 4-D (feature map) output")
    # A final softmax Dense is applied by hand without its softmax: the head stops at its input.
    last, head_output, logits_layer = model.layers[-1], model.outputs[0], None
    if isinstance(last, keras.layers.Dense) and last.activation is keras.activations.softmax:
        node = _first_call(last)
        if node.output_tensors[0] is model.outputs[0]:
            head_output, logits_layer = node.input_tensors[0], last
    features, head = _build_chain(model, path, head_output)
    return _Split(tuple(features), tuple(head), logits_layer, "/".join(layer.name for layer in path))


def _member_chain(body: Any) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """(features, head) of one ensemble member's body (input -> penultimate features)."""
    path = _target_path(body)
    if path is None:
        raise ValueError(f"grad_cam: ensemble member {body.name!r} has no layer with a 4-D (feature map) output")
    features, head = _build_chain(body, path, body.outputs[0])
    return tuple(features), tuple(head)


def _target_path(model: Any) -> list[Any] | None:
    """The layers leading to the target: [layer] in a flat model, [nested model, ..., layer] when
    the last 4-D output is inside a nested model whose own output is not 4-D. A nested model
    with a 4-D output is the target itself: its output is its last layer's feature map."""
    import keras

    for layer in reversed(model.layers):
        if isinstance(layer, keras.layers.InputLayer):
            continue
        outputs = _first_call(layer).output_tensors
        if len(outputs) == 1 and len(outputs[0].shape) == 4:
            return [layer]
        if isinstance(layer, keras.Model) and (inner := _target_path(layer)) is not None:
            return [layer, *inner]
    return None


def _build_chain(model: Any, path: list[Any], head_output: Any) -> tuple[list[Any], list[Any]]:
    """(features, head) model chains of ``model`` cut at ``path``, each model built from tensors
    of one graph only, which is what makes nested models work."""
    import keras

    layer = path[0]
    node = _first_call(layer)
    call_out = node.output_tensors[0]
    head = [] if head_output is call_out else [keras.Model(call_out, head_output)]
    if len(path) == 1:
        return [keras.Model(model.inputs[0], call_out)], head
    if len(node.input_tensors) != 1 or len(layer.inputs) != 1 or len(layer.outputs) != 1:
        raise ValueError(f"grad_cam: nested model {layer.name!r} must have one input and one output")
    call_in = node.input_tensors[0]
    inner_features, inner_head = _build_chain(layer, path[1:], layer.outputs[0])
    before = [] if call_in is model.inputs[0] else [keras.Model(model.inputs[0], call_in)]
    return [*before, *inner_features], [*inner_head, *head]


def _first_call(layer: Any) -> Any:
    """The node of the layer's call in its parent's graph, whose input_tensors/output_tensors
    are that call's tensors.

    For a nested model ``.input``/``.output`` are the tensors of its own graph, not of the call
    in the parent (the pitfall), so the first inbound node is read: the original call in a built
    or loaded model (grad models built here append later nodes)."""
    nodes = layer._inbound_nodes
    if not nodes:
        raise ValueError(f"grad_cam: layer {layer.name!r} is not part of a functional graph")
    return nodes[0]


def _as_slice(image: np.ndarray) -> np.ndarray:
    pixels = np.asarray(image)
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    if pixels.ndim != 3 or pixels.shape[-1] != 1:
        raise ValueError(f"expected one greyscale slice (H, W, 1) or (H, W), got shape {pixels.shape}")
    return pixels


def _resize(values: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a float map to (rows, cols)."""
    from PIL import Image

    values = np.asarray(values, dtype=np.float32)
    if values.shape == shape:
        return values
    resized = Image.fromarray(values).resize((shape[1], shape[0]), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.float32)


def _heat_from_cam(cam: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Upsample a class activation map to ``shape`` and scale it by its maximum into [0, 1]."""
    cam = np.nan_to_num(np.asarray(cam, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    heat = np.maximum(_resize(np.maximum(cam, 0.0), shape), 0.0)
    peak = float(heat.max()) if heat.size else 0.0
    if peak <= 0.0:
        return np.zeros(shape, np.float32)
    return np.clip(heat / peak, 0.0, 1.0).astype(np.float32)


def overlay_png(image: np.ndarray, heat: np.ndarray, alpha: float = 0.45) -> bytes:
    """PNG bytes of the greyscale slice with the heat map in the "jet" colour map blended on top
    (``alpha`` is the heat map's weight), at the slice's pixel size.

    A heat map of another size (the model's input size) is resized to the slice. Only a colour
    map lookup is needed: no pyplot figure, so no matplotlib backend is chosen or changed.
    """
    import io

    import matplotlib
    from PIL import Image

    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"overlay_png: alpha must be in [0, 1], got {alpha}")
    pixels = _as_slice(image)[..., 0]
    grey = np.clip(pixels.astype(np.float32), 0.0, 255.0) / 255.0
    heat = np.asarray(heat, dtype=np.float32)
    heat = _resize(heat[..., 0] if heat.ndim == 3 else heat, (grey.shape[0], grey.shape[1]))
    colours = matplotlib.colormaps["jet"](np.clip(np.nan_to_num(heat), 0.0, 1.0))[..., :3]
    blended = (1.0 - alpha) * grey[..., None] + alpha * colours
    buffer = io.BytesIO()
    Image.fromarray(np.round(blended * 255.0).astype(np.uint8), "RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def region_of_interest(heat: np.ndarray, threshold: float = 0.5, pixel_spacing_mm: tuple[float, float] | None = None,
                       original_shape: tuple[int, int] | None = None) -> dict[str, Any]:
    """The hot region of a heat map: the largest 4-connected component where heat >= threshold.

    Returns ``bbox`` {x0, y0, x1, y1} (heat-map pixels, x0/y0 inclusive, x1/y1 exclusive),
    ``area_px``, ``area_mm2``, ``centroid`` {x, y} (pixel indices, unweighted mean of the
    region's pixels), ``side``, ``patient_side``, ``quadrant`` and ``n_regions`` (components
    at the threshold; the others are not reported).

    ``side`` and ``quadrant`` are in IMAGE coordinates (x to the right, y down). Axial CT is
    displayed in radiological convention, the patient seen from the feet: the image's left is
    the patient's right. So ``patient_side`` is the opposite of ``side`` (for slices in that
    convention, as DICOM viewers and the Kaggle kidney set show them). ``side`` is "centre" when
    the centroid is within 10% of the image width of the vertical midline.

    ``pixel_spacing_mm`` is (row spacing, column spacing), DICOM PixelSpacing order. The model sees
    a resized slice while the spacing applies to the original pixels: with ``original_shape``
    (rows, cols of the original slice) the region is also given in original pixels
    (``bbox_original``, ``area_px_original``) and ``area_mm2`` uses the original spacing; without
    it the spacing is taken to be that of the heat map's pixels. ``area_mm2`` is None without a
    spacing. No pixel at the threshold: bbox None, area 0, and None for the location fields.
    """
    from scipy import ndimage

    heat = np.asarray(heat, dtype=np.float32)
    if heat.ndim == 3 and heat.shape[-1] == 1:
        heat = heat[..., 0]
    if heat.ndim != 2:
        raise ValueError(f"region_of_interest: expected a 2-D heat map, got shape {heat.shape}")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"region_of_interest: threshold must be in (0, 1], got {threshold}")
    rows, cols = heat.shape
    scale_y, scale_x = (1.0, 1.0) if original_shape is None else (original_shape[0] / rows, original_shape[1] / cols)
    mm2_per_px = None if pixel_spacing_mm is None else \
        float(pixel_spacing_mm[0]) * float(pixel_spacing_mm[1]) * scale_y * scale_x

    labels, n_regions = ndimage.label(np.nan_to_num(heat) >= threshold)
    region: dict[str, Any] = {"bbox": None, "area_px": 0, "area_mm2": None if mm2_per_px is None else 0.0,
                              "centroid": None, "side": None, "patient_side": None, "quadrant": None,
                              "n_regions": int(n_regions), "threshold": float(threshold)}
    if original_shape is not None:
        region |= {"bbox_original": None, "area_px_original": 0}
    if n_regions == 0:
        return region

    largest = 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))
    ys, xs = np.nonzero(labels == largest)
    x0, x1, y0, y1 = int(xs.min()), int(xs.max()) + 1, int(ys.min()), int(ys.max()) + 1
    cx, cy = float(xs.mean()), float(ys.mean())
    mid_x, mid_y = (cols - 1) / 2.0, (rows - 1) / 2.0
    side = "centre" if abs(cx - mid_x) <= CENTRE_BAND * cols else ("left" if cx < mid_x else "right")
    region |= {
        "bbox": {"x0": x0, "y0": y0, "x1": x1, "y1": y1},
        "area_px": int(xs.size),
        "area_mm2": None if mm2_per_px is None else float(xs.size * mm2_per_px),
        "centroid": {"x": cx, "y": cy},
        "side": side,
        "patient_side": {"left": "right", "right": "left", "centre": "centre"}[side],
        "quadrant": f"{'upper' if cy < mid_y else 'lower'}-{'left' if cx < mid_x else 'right'}",
    }
    if original_shape is not None:
        # Heat pixel j covers [j * scale, (j + 1) * scale) of the original; rounding first keeps
        # an exact product (4 * 16.0) from ceiling up by floating-point noise.
        def edge(value: float, up: bool) -> int:
            value = round(value, 6)
            return int(np.ceil(value)) if up else int(np.floor(value))

        region["bbox_original"] = {"x0": edge(x0 * scale_x, False), "y0": edge(y0 * scale_y, False),
                                   "x1": min(edge(x1 * scale_x, True), int(original_shape[1])),
                                   "y1": min(edge(y1 * scale_y, True), int(original_shape[0]))}
        region["area_px_original"] = int(round(xs.size * scale_x * scale_y))
    return region
