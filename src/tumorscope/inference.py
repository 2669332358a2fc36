"""From an image file to class probabilities: the one path that `tumorscope predict`, the
promotion gate and the Bento service share with training.

A trained model travels with its *input spec*: the classes in output order and every setting the
training cache applied to a decoded slice (input size, enhancements, the DICOM window). Training
writes it into ``train.json`` and the MLflow model's metadata; whoever loads the model reads it
back, so a file is decoded (``data.images.decode_greyscale``) and prepared
(``data.preprocess.prepare_slice``) exactly as the cache did it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tumorscope.artifacts import MODEL_FILE, TRAIN_REPORT
from tumorscope.config import PreprocessConfig, WindowConfig
from tumorscope.errors import UserError

# The preprocess settings that change pixels (cache_dir and report_path only say where).
PIXEL_SETTINGS = ("image_size", "clahe", "clahe_clip_limit", "equalize", "denoise", "denoise_weight", "body_crop",
                  "normalize")
SPEC_KEY = "tumorscope_input"  # the key of the input spec in an MLflow model's metadata
TRUST_KEY = "tumorscope_trust"  # ... and of the trust state (calibration, conformal sets, OOD check)


def input_spec(classes: list[str], preprocess: PreprocessConfig, window: WindowConfig) -> dict[str, Any]:
    """What a loaded model needs to turn a file into its input (JSON-serialisable)."""
    return {"classes": list(classes), "preprocess": {k: getattr(preprocess, k) for k in PIXEL_SETTINGS},
            "dicom_window": window.model_dump()}


def spec_preprocess(spec: dict) -> PreprocessConfig:
    """The model's pixel settings; where a cache or report would go means nothing for a loaded model."""
    nowhere = {name: "" for name in PreprocessConfig.model_fields if name not in PIXEL_SETTINGS}
    return PreprocessConfig.model_validate(nowhere | spec["preprocess"])


def spec_window(spec: dict) -> WindowConfig:
    return WindowConfig.model_validate(spec["dicom_window"])


def same_pixels(spec_a: dict, spec_b: dict) -> bool:
    """True when two specs turn a file into the same model input (so one cache serves both)."""
    return spec_a["preprocess"] == spec_b["preprocess"] and spec_a["dicom_window"] == spec_b["dicom_window"]


@dataclass
class PreparedImage:
    """A model-ready slice and what was learnt on the way (for explanations and the inference log)."""

    pixels: np.ndarray  # (size, size, 1) uint8: the model's input
    source_mode: str  # "DICOM", "L", "RGB", "I;16", ...
    original_shape: tuple[int, int]  # decoded slice, before resizing
    pixel_spacing_mm: tuple[float, float] | None = None  # DICOM PixelSpacing (row, column), when present
    decoded: np.ndarray | None = None  # the decoded slice before resizing (hashes, image statistics)
    view: np.ndarray | None = None  # the part of it the model saw, when not all of it (preprocess.body_crop)

    @property
    def shown(self) -> np.ndarray | None:
        """What an explanation is drawn on: the field of view the model saw."""
        return self.view if self.view is not None else self.decoded


def prepare_bytes(data: bytes, suffix: str, spec: dict) -> PreparedImage:
    """Decode file bytes and apply the training preprocessing. Raises ``UnreadableImage``."""
    from tumorscope.data.images import decode_greyscale, dicom_pixel_spacing
    from tumorscope.data.preprocess import field_of_view, model_input

    pixels, mode = decode_greyscale(data, suffix, spec_window(spec))
    cfg = spec_preprocess(spec)
    view = field_of_view(pixels, cfg)
    spacing = dicom_pixel_spacing(data) if mode == "DICOM" else None
    return PreparedImage(model_input(view, cfg)[:, :, np.newaxis], mode, (int(pixels.shape[0]), int(pixels.shape[1])),
                         spacing, pixels, None if view is pixels else view)


def prepare_file(path: str | Path, spec: dict) -> PreparedImage:
    """``prepare_bytes`` for a file on disk (size checked before it is read)."""
    from tumorscope.data.images import check_file_size

    path = Path(path)
    check_file_size(path.stat().st_size)
    return prepare_bytes(path.read_bytes(), path.suffix, spec)


@dataclass
class LoadedModel:
    """A Keras classifier with its input spec and where it came from."""

    model: Any
    spec: dict
    version: str  # e.g. "tumorscope-kidney-ct/3", "run:<id>", "file:models/model.keras"
    source: dict = field(default_factory=dict)  # registry name/version/alias, run id, path
    trust: dict | None = None  # calibration, conformal thresholds, OOD check (trust.answers.fit_trust)
    _with_features: Any = field(default=None, init=False, repr=False, compare=False)  # built on first use

    @property
    def classes(self) -> list[str]:
        return list(self.spec["classes"])

    @property
    def image_size(self) -> int:
        return int(self.spec["preprocess"]["image_size"])

    def predict_proba(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Inference-mode probabilities of (N, size, size, 1) uint8 images (the training cache's dtype)."""
        return predict_proba(self.model, images, batch_size)

    def answers(self, images: np.ndarray):
        """(raw probabilities, ``trust.answers.Judged`` or None for a model without a trust state):
        one forward pass for the probabilities and the embedding the OOD check reads."""
        if self.trust is None or len(images) == 0:
            return self.predict_proba(images), None
        from tumorscope.monitoring.features import feature_model, model_outputs
        from tumorscope.trust.answers import judge

        if self._with_features is None:
            self._with_features = feature_model(self.model)
        probabilities, embeddings = model_outputs(self.model, images, self.trust["ood"]["embedding_dims"],
                                                  with_features=self._with_features)
        return probabilities, judge(probabilities, embeddings, images, self.classes, self.trust)


def load_model_dir(model_dir: str | Path) -> LoadedModel:
    """The model a train stage wrote: ``model.keras`` and the input spec in ``train.json``."""
    import keras

    from tumorscope.reports import read_json

    model_dir = Path(model_dir)
    model_path, report_path = model_dir / MODEL_FILE, model_dir / TRAIN_REPORT
    for path in (model_path, report_path):
        if not path.is_file():
            raise UserError(f"{path} not found (train a model first: tumorscope train)")
    report = read_json(report_path)
    if "input_spec" not in report:
        raise UserError(f"{report_path} has no input_spec (written by an older version): retrain with tumorscope train")
    model = keras.saving.load_model(model_path)
    return LoadedModel(model, report["input_spec"], f"file:{model_path}",
                       {"path": str(model_path), "run_id": report.get("run_id")}, report.get("trust"))


def stack(prepared: list[PreparedImage], image_size: int) -> np.ndarray:
    """(N, size, size, 1) uint8 batch of prepared slices (an empty batch has the right shape)."""
    if not prepared:
        return np.zeros((0, image_size, image_size, 1), dtype=np.uint8)
    return np.stack([p.pixels for p in prepared])


def tta_views(batch: np.ndarray, kind: str = "none") -> list[np.ndarray]:
    """The views of a (N, H, W, C) batch that test-time augmentation averages over: the batch
    itself, and with ``flip`` also its left-right mirror (an axial slice's mirror is another
    plausible slice: the two kidneys swap sides)."""
    if kind == "none":
        return [batch]
    if kind == "flip":
        return [batch, batch[:, :, ::-1, :]]
    raise ValueError(f"unknown test-time augmentation {kind!r}")


def predict_proba(model, images, batch_size: int = 256, test_time_augmentation: str = "none") -> np.ndarray:
    """Inference-mode class probabilities, batch by batch from a (memory-mapped) array; with
    test-time augmentation, the mean of the probabilities of each view."""
    def one_batch(batch: np.ndarray) -> np.ndarray:
        views = tta_views(batch, test_time_augmentation)
        return np.mean([np.asarray(model.predict_on_batch(np.ascontiguousarray(v))) for v in views], axis=0)

    outputs = [one_batch(np.asarray(images[i:i + batch_size], dtype=np.uint8)) for i in range(0, len(images), batch_size)]
    return np.concatenate(outputs) if outputs else np.empty((0, model.output_shape[-1]))
