"""The project's params.yaml as the values tests start from: it is the one place a value lives,
so a test states only what it changes."""

from __future__ import annotations

from functools import cache
from typing import Any, TypeVar

from pydantic import BaseModel

from helpers.paths import REPO
from tumorscope.config import Params, load_params, merge, parse_params

Section = TypeVar("Section", bound=BaseModel)


@cache
def defaults() -> Params:
    return load_params(REPO / "params.yaml")


def _merged(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``merge``, except that a search space given is the whole space (not added to the project's)."""
    merged = merge(base, overrides)
    space = (overrides.get("tune") or {}).get("search_space")
    if space is not None:
        merged["tune"]["search_space"] = space
    return merged


def params_with(overrides: dict[str, Any] | None = None) -> Params:
    """The project's params with nested overrides, validated, e.g. {"train": {"epochs": 1}}."""
    return parse_params(_merged(defaults().model_dump(by_alias=True), overrides or {}))


def _first_of(kind: type[Section], node: BaseModel) -> Section | None:
    if isinstance(node, kind):
        return node
    for name in type(node).model_fields:
        value = getattr(node, name)
        if isinstance(value, BaseModel) and (found := _first_of(kind, value)) is not None:
            return found
    return None


def section(kind: type[Section], **overrides: Any) -> Section:
    """A validated ``kind`` (TrainConfig, WindowConfig, ...) at the project's values with
    ``overrides``; a section that occurs twice (WindowConfig) starts from its first place."""
    found = _first_of(kind, defaults())
    if found is None:
        raise LookupError(f"params.yaml has no {kind.__name__}")
    return kind.model_validate(found.model_dump(by_alias=True) | overrides)


def params_where(dotted_key: str, value: Any) -> Params:
    """The project's params with one value replaced, not merged (``"tune.search_space"``: this
    space and no other dimension), validated."""
    raw = defaults().model_dump(by_alias=True)
    *parents, last = dotted_key.split(".")
    node = raw
    for key in parents:
        node = node[key]
    node[last] = value
    return parse_params(raw)


def raw_params_with(overrides: dict[str, Any]) -> dict[str, Any]:
    """The project's params.yaml as a mapping with nested overrides, not validated (for a test
    that writes a bad value on purpose)."""
    import yaml

    return _merged(yaml.safe_load((REPO / "params.yaml").read_text()), overrides)
