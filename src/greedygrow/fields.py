"""Specs as frozen dataclasses built from plain dicts (JSON meta, YAML overrides); one check
names unknown keys for every spec, so a typo is never ignored."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

S = TypeVar("S", bound="DictSpec")


def checked_fields(cls: type, data: dict[str, Any], where: str) -> dict[str, Any]:
    """`data` as keyword arguments for dataclass `cls`, lists as tuples; ValueError names any
    unknown keys and the known ones."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; known keys are {sorted(names)}")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}


def check_positive_ints(spec: Any, where: str) -> None:
    """Raise ValueError unless every field of `spec` annotated `int` holds a positive int."""
    for f in dataclasses.fields(spec):
        value = getattr(spec, f.name)
        if f.type in (int, "int") and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{where}: {f.name} must be a positive int, got {value!r}")


class DictSpec:
    """Mixin for frozen dataclasses: `to_dict` and its strict inverse `from_dict`."""

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON/YAML."""
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[S], data: dict[str, Any]) -> S:
        """Inverse of `to_dict`; unknown keys are an error."""
        return cls(**checked_fields(cls, data, f"{cls.__name__}.from_dict"))
