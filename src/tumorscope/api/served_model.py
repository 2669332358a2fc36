"""The model side of the service: one loaded classifier, swapped whole on reload, answering batches
with probabilities and an embedding summary, and explaining a slice with Grad-CAM."""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from tumorscope.api.refusals import one_line
from tumorscope.monitoring.features import feature_model, summarize_embedding
from tumorscope.reports import jsonable, utc_now


@dataclass
class _Current:
    loaded: Any  # inference.LoadedModel
    features: Any  # feature_model(loaded.model)
    loaded_at: str
    embedding_dims: int  # of the embedding summary each answer carries (serve.embedding_dims)


class ServedModel:
    """The model service's state: one loaded model, swapped whole on reload (a request holds the
    model it started with, so a batch never mixes two versions), and counts of the batch sizes it
    ran (the evidence that adaptive batching batches).

    ``loader(name, ref)`` returns an ``inference.LoadedModel`` (``registry.load_model`` by default);
    ``resolver(name, ref)`` returns the registered version an alias or number names now, or None for
    a URI (``reload`` skips loading when it is the version already served)."""

    def __init__(self, name: str, ref: str, embedding_dims: int, loader=None, resolver=None):
        self.name, self.ref, self.embedding_dims = name, ref, embedding_dims
        self._loader = loader or _registry_loader
        self._resolver = resolver or _registry_resolver
        self._current: _Current | None = None
        self.load_error: str | None = None
        self._lock = threading.Lock()
        self.batch_sizes: Counter[int] = Counter()

    @property
    def ready(self) -> bool:
        return self._current is not None

    def _load(self) -> _Current:
        loaded = self._loader(self.name, self.ref)
        current = _Current(loaded, feature_model(loaded.model), utc_now(), self.embedding_dims)
        # One warm-up pass: the first predict traces the function (seconds on TensorFlow), which
        # would otherwise land on the first request and on the batching dispatcher's timing.
        warm = np.zeros((1, loaded.image_size, loaded.image_size, 1), dtype=np.uint8)
        current.features.predict_on_batch(warm)
        return current

    def load(self) -> bool:
        """Load the configured model; on failure keep serving none and record why (readiness and
        health say so; ``reload`` tries again)."""
        from tumorscope.errors import UserError

        try:
            current = self._load()
        except UserError as err:
            self.load_error = one_line(str(err))
            return False
        except Exception as err:  # a broken artefact, an unreachable store: recorded, the server stays up
            self.load_error = one_line(f"{type(err).__name__}: {err}")
            return False
        with self._lock:
            self._current, self.load_error = current, None
        return True

    def current(self) -> _Current:
        current = self._current
        if current is None:
            raise ModelUnavailable(f"no model loaded ({self.load_error or 'not loaded yet'})")
        return current

    def predict(self, images: np.ndarray) -> list[dict[str, Any]]:
        """Per (size, size, 1) uint8 image of a batch: the model's probabilities, the embedding
        summary, and the trust fields (``trust.answers.Judged.answer``; None for a model without a
        trust state), all from one forward pass."""
        current = self.current()
        answers = self._answers(current, images)
        with self._lock:
            self.batch_sizes[len(answers)] += 1
        return answers

    @staticmethod
    def _answers(current: _Current, images: np.ndarray) -> list[dict[str, Any]]:
        loaded = current.loaded
        images = np.asarray(images, dtype=np.uint8)
        expected = (loaded.image_size, loaded.image_size, 1)
        if images.ndim != 4 or images.shape[1:] != expected:
            raise ValueError(f"images of shape {images.shape[1:]} for a model that takes {expected}")
        outputs = current.features.predict_on_batch(images)
        probabilities = np.asarray(outputs[0], dtype=np.float64)
        features = np.asarray(outputs[1])
        embeddings = summarize_embedding(features, current.embedding_dims)
        judged = None
        if loaded.trust is not None:
            from tumorscope.trust.answers import judge

            judged = judge(probabilities, summarize_embedding(features, loaded.trust["ood"]["embedding_dims"]), images,
                           loaded.classes, loaded.trust)
        return [{"probabilities": probabilities[i].tolist(), "embedding": embeddings[i].astype(float).tolist(),
                 "trust": None if judged is None else judged.answer(i, loaded.classes),
                 "model_version": loaded.version, "batch_size": len(images)} for i in range(len(images))]

    def explain(self, image: np.ndarray, class_index: int | None = None) -> dict[str, Any]:
        """Grad-CAM heat map (size, size) in [0, 1] of one prepared slice, with the slice's answer
        as ``predict`` gives it (so the explanation is logged without a second forward pass)."""
        from tumorscope.models.explain import grad_cam

        current = self.current()
        image = np.asarray(image, dtype=np.uint8)
        answer = self._answers(current, image[np.newaxis])[0]
        heat = grad_cam(current.loaded.model, image, class_index)
        return answer | {"heat": np.asarray(heat, dtype=np.float32),
                         "class_index": int(np.argmax(answer["probabilities"])) if class_index is None else int(class_index)}

    def info(self) -> dict[str, Any]:
        current = self._current
        with self._lock:
            histogram = {str(size): count for size, count in sorted(self.batch_sizes.items())}
            batches = sum(self.batch_sizes.values())
            images = sum(size * count for size, count in self.batch_sizes.items())
            largest = max(self.batch_sizes, default=0)
        batching = {"batches": batches, "images": images, "largest_batch": largest,
                    "batch_size_histogram": histogram}
        if current is None:
            return {"ready": False, "load_error": self.load_error, "registered_model": self.name, "ref": self.ref,
                    "batching": batching}
        loaded = current.loaded
        return {"ready": True, "load_error": None, "registered_model": self.name, "ref": self.ref,
                "model_version": loaded.version, "source": jsonable(loaded.source), "classes": loaded.classes,
                "image_size": loaded.image_size, "spec": loaded.spec, "loaded_at": current.loaded_at,
                "trust": trust_summary(loaded.trust), "batching": batching}

    def reload(self, force: bool = False) -> dict[str, Any]:
        """Load what ``ref`` names now (the alias may have moved); keep the served model when that is
        the same registered version (unless ``force``) or when loading fails."""
        from tumorscope.errors import UserError

        previous = self._current.loaded.version if self._current else None
        if not force and self._current is not None:
            try:
                version = self._resolver(self.name, self.ref)
            except UserError as err:
                return {"reloaded": False, "changed": False, "model_version": previous, "error": one_line(str(err))}
            if version is not None and self._current.loaded.source.get("version") == version:
                return {"reloaded": False, "changed": False, "model_version": previous, "error": None}
        if not self.load():
            return {"reloaded": False, "changed": False, "model_version": previous, "error": self.load_error}
        version_now = self.current().loaded.version
        return {"reloaded": True, "changed": version_now != previous, "previous_version": previous,
                "model_version": version_now, "error": None}


def trust_summary(trust: dict | None) -> dict[str, Any] | None:
    """What a reader of the metadata needs of a trust state (not its fitted densities)."""
    if trust is None:
        return None
    conformal, ood = trust["conformal"], trust["ood"]
    return {"temperature": trust["temperature"], "alpha": conformal["alpha"], "coverage_target": 1 - conformal["alpha"],
            "score": conformal["score"], "class_conditional": conformal["class_conditional"],
            "calibration_groups": conformal["n_groups"], "ood_quantile": ood["quantile"],
            "ood_distance_threshold": ood["distance_threshold"], "intensity_quantile": ood["intensity_quantile"]}


class ModelUnavailable(RuntimeError):
    """No model is loaded (the registry had none, or loading failed): the service answers 503."""

    retry_after_s = 10


class ModelOverloaded(ModelUnavailable):
    """The model service's batching dispatcher refused work it could not finish within
    serve.max_latency_ms (load shedding): 503 with a short Retry-After; a client retries."""

    retry_after_s = 1


def _registry_loader(name: str, ref: str):
    from tumorscope import registry

    return registry.load_model(name, ref)


def _registry_resolver(name: str, ref: str) -> int | None:
    if ":/" in ref:
        return None
    import mlflow

    from tumorscope import registry

    return int(registry.get_version(mlflow.MlflowClient(), name, ref).version)
