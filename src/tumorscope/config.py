"""Typed configuration: the schema of params.yaml, validated once.

params.yaml holds every value and its explanation; this module holds only what a value may be
(types, bounds, rules across fields), so no default is written twice. What tune.search_space may
hold is tumorscope.tuning.space's rule, applied here. Every stage reads only its own section, so
DVC can declare exactly the params a stage depends on. A bad or missing value raises
``ConfigError`` whose message names the dotted key (``train.lr``), which the CLI prints as one
line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)

from tumorscope.errors import UserError
from tumorscope.models.architectures import ARCHITECTURES
from tumorscope.tuning.space import RangeSpec, checked_space

CANONICAL_CLASSES = ("Cyst", "Normal", "Stone", "Tumor")
# The sections an ablation variant may override.
ABLATION_SECTIONS = {"preprocess", "train", "evaluate", "seed", "cross_source"}

Probability = Annotated[float, Field(ge=0, le=1)]
OpenUnit = Annotated[float, Field(gt=0, lt=1)]          # strictly between 0 and 1
ImageSide = Annotated[int, Field(ge=16, le=1024)]
Folds = Annotated[int, Field(ge=3, le=20)]
Port = Annotated[int, Field(ge=1, le=65535)]


def _known_architecture(name: str) -> str:
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; one of {', '.join(ARCHITECTURES)}")
    return name


Architecture = Annotated[str, AfterValidator(_known_architecture)]


class ConfigError(UserError, ValueError):
    """A params.yaml problem a user can fix; the message names the key."""


class _Section(BaseModel):
    # Unknown keys are typos: reject them instead of silently ignoring a knob.
    model_config = ConfigDict(extra="forbid", frozen=True)


class WindowConfig(_Section):
    level: float
    width: PositiveFloat


class DataConfig(_Section):
    source: str
    raw_dir: str
    added_dir: str
    report_path: str
    class_map: dict[str, str | None]
    image_extensions: list[str]
    dicom_window: WindowConfig


class PhantomConfig(_Section):
    out_dir: str
    n_images: Annotated[int, Field(ge=8)]
    image_size: Annotated[int, Field(ge=32, le=1024)]
    proportions: dict[str, float]
    noise_hu: NonNegativeFloat
    blur_sigma: NonNegativeFloat
    window: WindowConfig

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
    path: str
    quarantine_path: str


class ValidateConfig(_Section):
    suite_dir: str
    docs_dir: str
    result_path: str
    min_images_per_class: PositiveInt
    max_class_imbalance: Annotated[float, Field(ge=1)]
    min_side: PositiveInt
    max_side: PositiveInt
    min_intensity_std: NonNegativeFloat
    max_quarantined_fraction: Probability


class SplitConfig(_Section):
    path: str
    report_path: str
    metrics_path: str
    train: OpenUnit
    val: OpenUnit
    test: OpenUnit
    phash_threshold: Annotated[int, Field(ge=0, le=64)]
    tolerance: OpenUnit

    @model_validator(mode="after")
    def _fractions_sum_to_one(self) -> SplitConfig:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + val + test must be 1, got {total:g}")
        return self


class PreprocessConfig(_Section):
    cache_dir: str
    report_path: str
    image_size: ImageSide
    clahe: bool
    clahe_clip_limit: PositiveFloat
    equalize: bool
    denoise: bool
    denoise_weight: PositiveFloat
    body_crop: bool
    normalize: Literal["none", "percentile"]


class AuditConfig(_Section):
    report_path: str
    summary_path: str
    metrics_path: str
    min_series: PositiveInt
    folds: Annotated[int, Field(ge=2, le=20)]
    thumbnail_size: Annotated[int, Field(ge=4, le=64)]


class TrainConfig(_Section):
    model_dir: str
    architecture: Architecture
    weights: str | None
    fit: Literal["fine_tune", "linear_probe"]
    probe_c: Annotated[list[float], Field(min_length=1)]
    head_epochs: NonNegativeInt
    unfreeze_top_n: Annotated[int, Field(ge=-1)]
    fine_tune_lr: OpenUnit
    epochs: PositiveInt
    batch_size: PositiveInt
    lr: OpenUnit
    dropout: Annotated[float, Field(ge=0, lt=1)]
    filters: Annotated[int, Field(ge=4)]
    dense_units: Annotated[int, Field(ge=4)]
    augment_strength: Annotated[float, Field(ge=0, le=0.5)]
    augment_in: Literal["loader", "model"]
    intensity_augment: Annotated[float, Field(ge=0, le=0.5)]
    export_augment: Probability
    balanced_batches: bool
    norm: Literal["none", "batch"]
    class_weights: bool
    patience: PositiveInt
    monitor: Literal["val_loss", "val_macro_f1"]
    warmup_epochs: NonNegativeInt
    precision: Literal["auto", "float32", "mixed_float16", "mixed_bfloat16"]
    gpu_batch_multiplier: Annotated[int, Field(ge=1, le=64)]
    distribution: Literal["auto", "none"]
    loader_workers: Annotated[int, Field(ge=0, le=64)]
    ensemble_members: Annotated[int, Field(ge=1, le=16)]
    init_weights: str | None

    @model_validator(mode="after")
    def _one_start(self) -> TrainConfig:
        if self.init_weights and self.ensemble_members > 1:
            raise ValueError("init_weights starts one model from another's weights: with ensemble_members > 1 the "
                             "members would be one model, not an ensemble")
        return self

    def augment_strength_in(self, place: Literal["loader", "model"]) -> float:
        """augment_strength where augmentation runs (``augment_in``), 0 in the other place."""
        return self.augment_strength if self.augment_in == place else 0.0


class EvaluateConfig(_Section):
    out_dir: str
    metrics_path: str
    calibration_bins: Annotated[int, Field(ge=2)]
    critical_class: str
    bootstrap_samples: Annotated[int, Field(ge=10)]
    confidence: OpenUnit
    max_single_class_share: Annotated[float, Field(gt=0, le=1)]
    fail_on_degenerate: bool
    distance_bands: list[int]
    test_time_augmentation: Literal["none", "flip"]

    @field_validator("distance_bands")
    @classmethod
    def _bands_between_0_and_63(cls, bands: list[int]) -> list[int]:
        if any(not 0 <= b < 64 for b in bands) or len(set(bands)) != len(bands):
            raise ValueError("distinct distances from 0 to 63")
        return sorted(bands)


class ConformalConfig(_Section):
    alpha: OpenUnit
    score: Literal["lac", "aps"]
    class_conditional: bool


class OodConfig(_Section):
    quantile: Annotated[float, Field(gt=0.5, lt=1)]
    embedding_dims: Annotated[int, Field(ge=2, le=256)]
    intensity_quantile: Annotated[float, Field(gt=0.5, lt=1)]
    export_augment: Probability


class CrossvalConfig(_Section):
    folds: Folds
    use_best_params: bool
    report_path: str


class CrossSourceConfig(_Section):
    path: str | None
    phash_distance: Annotated[int, Field(ge=0, le=64)]
    train_on: bool


class AblationConfig(_Section):
    folds: Folds
    baseline: str
    variants: dict[str, dict[str, Any]]
    common: dict[str, Any]
    train_share: Annotated[float, Field(gt=0, le=1)]
    learning_curve: list[float]
    ensembles: dict[str, list[str]]
    out_dir: str
    report_path: str

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


class TuneConfig(_Section):
    study_name: str
    storage: str
    n_trials: NonNegativeInt
    workers: PositiveInt
    fan_out: Literal["processes", "deployment"]
    worker_deployment: str
    timeout_minutes: PositiveFloat | None
    trial_epochs: PositiveInt
    metric: Literal["macro_f1", "critical_recall"]
    min_critical_recall: Probability
    pruner: Literal["median", "hyperband", "none"]
    pruner_warmup_epochs: NonNegativeInt
    heartbeat_seconds: PositiveInt
    architecture_concurrency: dict[Architecture, PositiveInt]
    leaderboard_path: str
    best_params_path: str
    plots_dir: str
    search_space: dict[str, list[str | int | float | bool] | RangeSpec]

    @field_validator("search_space", mode="before")
    @classmethod
    def _searchable(cls, space: Any) -> dict:
        return checked_space(space, TrainConfig)


class PromoteConfig(_Section):
    registered_model: Annotated[str, Field(min_length=1)]
    report_path: str
    metrics_path: str
    min_macro_f1_low: Probability
    min_critical_recall_low: Probability
    max_ece: Probability
    coverage_tolerance: Probability
    min_improvement: Annotated[float, Field(ge=-1, le=1)]
    min_improvement_on_readings: Annotated[float, Field(ge=-1, le=1)] | None
    require_beating_acquisition_baselines: bool


class AuthConfig(_Section):
    keys_env: str
    admin_keys_env: str
    reviewer_keys_env: str
    keys_file: str | None
    anonymous: bool


class ServeConfig(_Section):
    model: str
    alert_threshold: Probability
    max_upload_bytes: Annotated[int, Field(ge=1024)]
    max_batch_files: PositiveInt
    max_batch_size: Annotated[int, Field(ge=2)]   # BentoML's adaptive batching refuses 1
    max_latency_ms: PositiveInt
    inference_log: str
    log_max_bytes: Annotated[int, Field(ge=4096)]
    log_backups: PositiveInt
    replica_id: str | None
    embedding_dims: Annotated[int, Field(ge=1, le=64)]
    predictions_dir: str
    auth: AuthConfig


class ReviewConfig(_Section):
    queue_dir: str
    sample_rate: Probability
    max_items: PositiveInt
    max_age_days: PositiveFloat
    batch_prefix: str
    min_readings: PositiveInt
    alpha: OpenUnit
    report_path: str
    retrain_after: PositiveInt


class ScannerConfig(_Section):
    noise_hu: NonNegativeFloat
    blur_sigma: NonNegativeFloat
    window: WindowConfig
    image_size: Annotated[int, Field(ge=32, le=1024)]
    field_of_view: Annotated[float, Field(gt=0.3, le=1.0)]


class PhantomBatchConfig(_Section):
    out_dir: str
    n_images: Annotated[int, Field(ge=8)]
    seed: int
    scanner: Literal["same", "other"]
    other: ScannerConfig


class RetrainConfig(_Section):
    deployment: str | None
    new_data: str | None
    tune: bool
    warm_start: bool
    parameters: dict[str, Any]
    wait_seconds: NonNegativeInt


class MonitorConfig(_Section):
    current: str
    window: PositiveInt
    min_window: Annotated[int, Field(ge=2)]
    drift_share: Annotated[float, Field(gt=0, le=1)]
    method: str | None
    threshold: float | None
    embedding_method: Literal["ratio", "distance", "mmd", "model"]
    embedding_threshold: float | None
    summary_path: str
    metrics_path: str
    report_dir: str
    checks_dir: str
    reference_dir: str
    workspace: str
    project: str
    webhook_url: str | None
    notification_block: str | None
    retrain: RetrainConfig
    phantom_batch: PhantomBatchConfig


class MlflowServerConfig(_Section):
    host: str
    port: Port
    workers: PositiveInt
    backend_store_uri: str | None
    artifacts_destination: str | None
    allowed_hosts: str | None


class MlflowConfig(_Section):
    tracking_uri: str
    artifact_root: str
    experiment: str
    server: MlflowServerConfig


class Params(_Section):
    seed: int
    data: DataConfig
    phantom: PhantomConfig
    manifest: ManifestConfig
    validate_: ValidateConfig = Field(alias="validate")
    split: SplitConfig
    preprocess: PreprocessConfig
    audit: AuditConfig
    train: TrainConfig
    evaluate: EvaluateConfig
    conformal: ConformalConfig
    ood: OodConfig
    tune: TuneConfig
    crossval: CrossvalConfig
    cross_source: CrossSourceConfig
    ablation: AblationConfig
    promote: PromoteConfig
    serve: ServeConfig
    review: ReviewConfig
    monitor: MonitorConfig
    mlflow: MlflowConfig

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


def _dotted(loc: tuple) -> str:
    return ".".join(str(part) for part in loc if part != "__root__")


def parse_params(raw: dict | None) -> Params:
    """Validate a complete params mapping; raise ConfigError naming the first bad or missing key."""
    try:
        return Params.model_validate(raw or {})
    except ValidationError as err:
        first = err.errors()[0]
        key = _dotted(first["loc"]) or "params"
        if first["type"] == "missing":
            raise ConfigError(f"params.yaml has no '{key}': every setting needs a value (the project's "
                              "params.yaml lists them all)") from None
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
