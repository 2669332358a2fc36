"""The search space: what tune.search_space may hold, and what a trial draws from it.

This module owns the whole idea: which train settings are tunable, which ones mean something
for which architecture (a conditional space), how a range is written, and the check that every
choice is a value train.<name> itself accepts. The config schema calls ``checked_space`` when
params.yaml is read, passing its train schema, so this module imports no config.
"""

from __future__ import annotations

from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError, model_validator

TUNABLE = ("architecture", "lr", "fine_tune_lr", "head_epochs", "unfreeze_top_n", "dropout", "dense_units",
           "filters", "norm", "augment_strength", "batch_size", "class_weights")
APPLICATION_ONLY = ("fine_tune_lr", "head_epochs", "unfreeze_top_n")
SMALL_CNN_ONLY = ("filters", "norm")
Train = TypeVar("Train", bound=BaseModel)


class RangeSpec(BaseModel):
    """A numeric search dimension: integer or float by the train setting it tunes."""

    model_config = ConfigDict(extra="forbid", frozen=True)
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


def checked_space(space: Any, train_schema: type[BaseModel]) -> dict[str, list | RangeSpec]:
    """tune.search_space validated against the train settings' own types and bounds; the first
    problem is a ValueError naming the setting."""
    if not isinstance(space, dict) or not space:
        raise ValueError("the search space is empty: give at least one train.* setting to search")
    return {name: _checked_dimension(name, dimension, train_schema) for name, dimension in space.items()}


def _checked_dimension(name: str, dimension: Any, train_schema: type[BaseModel]) -> list | RangeSpec:
    if name not in TUNABLE:
        raise ValueError(f"'{name}' is not a tunable train setting; tunable: {list(TUNABLE)}")
    if isinstance(dimension, RangeSpec):
        dimension = dimension.model_dump()
    if isinstance(dimension, list):
        if not dimension:
            raise ValueError(f"'{name}' has no choices")
        for choice in dimension:
            _check_train_value(train_schema, name, choice)
        return dimension
    if not isinstance(dimension, dict):
        raise ValueError(f"'{name}' must be a list of choices or {{low, high[, log, step]}}")
    try:
        bounds = RangeSpec.model_validate(dimension)
    except ValidationError as err:
        raise ValueError(f"'{name}' range: {err.errors()[0]['msg']}") from None
    kind = train_schema.model_fields[name].annotation
    if kind not in (int, float):
        raise ValueError(f"'{name}' is categorical: give a list of choices")
    if kind is int and (bounds.low != int(bounds.low) or bounds.high != int(bounds.high)):
        raise ValueError(f"'{name}' is an integer setting: give integer low/high")
    _check_train_value(train_schema, name, bounds.low)
    _check_train_value(train_schema, name, bounds.high)
    return bounds


def _check_train_value(train_schema: type[BaseModel], name: str, value: Any) -> None:
    """Reject a search-space value that train.<name> itself would reject."""
    field = train_schema.model_fields[name]
    try:
        kind: Any = Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation
        TypeAdapter(kind).validate_python(value)
    except ValidationError as err:
        raise ValueError(f"'{name}' choice {value!r}: {err.errors()[0]['msg']}") from None


def applies_to(name: str, architecture: str) -> bool:
    """Whether train.<name> means anything for this architecture (conditional search space)."""
    if name in APPLICATION_ONLY:
        return architecture != "small_cnn"
    if name in SMALL_CNN_ONLY:
        return architecture == "small_cnn"
    return True


def suggest(trial, name: str, dimension: list | RangeSpec, train_schema: type[BaseModel]) -> object:
    if isinstance(dimension, list):
        return trial.suggest_categorical(name, dimension)
    if train_schema.model_fields[name].annotation is int:
        step = int(dimension.step or 1)
        return trial.suggest_int(name, int(dimension.low), int(dimension.high), step=step, log=dimension.log)
    return trial.suggest_float(name, dimension.low, dimension.high, log=dimension.log, step=dimension.step)


def suggest_train_config(trial, base: Train, space: dict, epochs: int) -> Train:
    """The trial's train config: base values, the architecture first, then only the settings
    that apply to it (fine-tuning knobs for Applications, filters/norm for the small CNN)."""
    schema, base_values = type(base), base.model_dump()
    values = {}
    if "architecture" in space:
        values["architecture"] = suggest(trial, "architecture", space["architecture"], schema)
    architecture = str(values.get("architecture", base_values["architecture"]))
    for name, dimension in space.items():
        if name != "architecture" and applies_to(name, architecture):
            values[name] = suggest(trial, name, dimension, schema)
    return schema.model_validate(base_values | values | {"epochs": epochs})
