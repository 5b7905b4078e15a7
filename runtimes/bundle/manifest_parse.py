"""Reading helpers for the manifest records: each returns a field of a JSON object or refuses it with a one-line
BundleError that names it (`where.key`) and says to rebuild. A missing or null field reads as the default.
Stdlib only."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any, ClassVar, TypeVar

from bitdeploy.core.errors import BundleError


def bad(where: str, what: str, value: Any) -> BundleError:
    return BundleError(f"manifest {where} must be {what} (got {value!r}); rebuild the bundle")


def obj(data: Mapping[str, Any], key: str, where: str = "") -> Mapping[str, Any] | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, Mapping):
        name = f"{where}.{key}" if where else f"field {key!r}"
        raise BundleError(f"manifest {name} must be an object (got {type(value).__name__}); rebuild the bundle")
    return value


def text(data: Mapping[str, Any], key: str, where: str, default: str | None = None) -> str | None:
    value = data.get(key)
    if value is None:
        return default
    if not isinstance(value, str):
        raise bad(f"{where}.{key}", "a string", value)
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def num(data: Mapping[str, Any], key: str, where: str) -> float | None:
    """A number, as a float (the gate's and self-test's figures)."""
    value = number(data, key, where)
    return None if value is None else float(value)


def number(data: Mapping[str, Any], key: str, where: str) -> float | None:
    """A number as written: an integer stays an integer, so a rewritten manifest keeps its bytes."""
    value = data.get(key)
    if value is None:
        return None
    if not _is_number(value):
        raise bad(f"{where}.{key}", "a number", value)
    return value


def numbers(data: Mapping[str, Any], key: str, where: str) -> tuple[float, ...] | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not all(_is_number(v) for v in value):
        raise bad(f"{where}.{key}", "a list of numbers", value)
    return tuple(value)


def integer(data: Mapping[str, Any], key: str, where: str) -> int | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(f"{where}.{key}", "an integer", value)
    return value


def dim(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(where, "a list of integers", value)
    return value


def rest(data: Mapping[str, Any], known: tuple[str, ...]) -> dict[str, Any]:
    """The keys of `data` not in `known`, as read."""
    return {k: v for k, v in data.items() if k not in known}


def drop_none(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if v is not None}


R = TypeVar("R", bound="FlatRecord")
READERS: dict[str, Any] = {
    "int | None": integer,
    "float | None": number,
    "str | None": text,
    "tuple[float, ...] | None": numbers,
}


class FlatRecord:
    """A frozen dataclass of optional scalars (int, float, str, tuple of floats) read and written by field name:
    `from_dict` checks each field by its annotation, `to_dict` writes them in field order (tuples as lists)."""

    SECTION: ClassVar[str]  # the manifest key the record is read from, for error messages

    @classmethod
    def from_dict(cls: type[R], data: Mapping[str, Any]) -> R:
        return cls(**{f.name: READERS[str(f.type)](data, f.name, cls.SECTION) for f in fields(cls)})  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, Any]:
        values = {f.name: getattr(self, f.name) for f in fields(self)}  # type: ignore[arg-type]
        return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
