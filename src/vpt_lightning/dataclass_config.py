"""A small base for the dataclasses behind the config groups: build from a mapping, dump to a dict."""

from __future__ import annotations

import difflib
import math
from dataclasses import asdict, fields
from typing import Any, Callable, ClassVar, Collection, Iterable, Mapping, Optional, Type, TypeVar, Union

T = TypeVar("T", bound="DataclassConfig")


class DataclassConfig:
    """Mixin for ``@dataclass`` config classes; ``group`` names the config group in error messages."""

    group: ClassVar[str] = "config"

    @classmethod
    def from_mapping(cls: Type[T], cfg: Optional[Mapping[str, Any]]) -> T:
        """Build from a dict or DictConfig, naming unknown keys and the valid ones in the error."""
        cfg = dict(cfg or {})
        cls.refuse_unknown_keys(cfg)
        return cls(**cfg)

    @classmethod
    def refuse_unknown_keys(cls, keys: Iterable[str]) -> None:
        """A ``ValueError`` naming the ``keys`` that are not fields of this class (with the closest field, if
        one is close) and the valid keys; nothing when all are fields."""
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(keys) - known)
        if unknown:
            raise ValueError(unknown_keys_message(cls.group, unknown, known))

    def to_dict(self) -> dict:
        return asdict(self)  # type: ignore[call-overload]


def unknown_keys_message(group: str, unknown: Collection[str], known: Collection[str]) -> str:
    """``unknown <group> option(s) [...] (did you mean ...?); valid keys are [...]`` (close matches by difflib)."""
    close = {key: difflib.get_close_matches(key, sorted(known), n=1) for key in sorted(unknown)}
    hints = [f"{match[0]!r}" + (f" for {key!r}" if len(unknown) > 1 else "") for key, match in close.items() if match]
    hint = f" (did you mean {', '.join(hints)}?)" if hints else ""
    return f"unknown {group} option(s) {sorted(unknown)}{hint}; valid keys are {sorted(known)}"


def number(key: str, value: Any, valid: str, test: Callable[[float], bool], integer: bool = False) -> Union[int, float]:
    """``value`` as a finite float (or an int), or a ``ValueError`` naming the config ``key`` and the ``valid`` values.

    Numeric strings are converted (``"0.1"``); booleans and anything else are refused.
    """
    try:
        if isinstance(value, bool):
            raise TypeError
        result = float(value)
        if not math.isfinite(result) or (integer and not result.is_integer()):
            raise ValueError
    except (TypeError, ValueError):
        raise ValueError(f"{key}={value!r} is not a valid number; it must be {valid}") from None
    result = int(result) if integer else result
    if not test(result):
        raise ValueError(f"{key}={value!r} must be {valid}")
    return result
