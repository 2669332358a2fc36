"""The search space: what a trial draws from tune.search_space, conditional on the architecture."""

from __future__ import annotations

from tumorscope.config import APPLICATION_ONLY, SMALL_CNN_ONLY, RangeSpec, TrainConfig


def applies_to(name: str, architecture: str) -> bool:
    """Whether train.<name> means anything for this architecture (conditional search space)."""
    if name in APPLICATION_ONLY:
        return architecture != "small_cnn"
    if name in SMALL_CNN_ONLY:
        return architecture == "small_cnn"
    return True


def suggest(trial, name: str, dimension) -> object:
    if isinstance(dimension, list):
        return trial.suggest_categorical(name, dimension)
    assert isinstance(dimension, RangeSpec)
    if TrainConfig.model_fields[name].annotation is int:
        step = int(dimension.step or 1)
        return trial.suggest_int(name, int(dimension.low), int(dimension.high), step=step, log=dimension.log)
    return trial.suggest_float(name, dimension.low, dimension.high, log=dimension.log, step=dimension.step)


def suggest_train_config(trial, base: TrainConfig, space: dict, epochs: int) -> TrainConfig:
    """The trial's train config: base values, the architecture first, then only the settings
    that apply to it (fine-tuning knobs for Applications, filters/norm for the small CNN)."""
    values = {}
    if "architecture" in space:
        values["architecture"] = suggest(trial, "architecture", space["architecture"])
    architecture = str(values.get("architecture", base.architecture))
    for name, dimension in space.items():
        if name != "architecture" and applies_to(name, architecture):
            values[name] = suggest(trial, name, dimension)
    return TrainConfig.model_validate(base.model_dump() | values | {"epochs": epochs})
