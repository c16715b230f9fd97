"""A small base for the dataclasses behind the config groups: build from a mapping, dump to a dict."""

from __future__ import annotations

import math
from dataclasses import asdict, fields
from typing import Any, Callable, ClassVar, Mapping, Optional, Type, TypeVar, Union

T = TypeVar("T", bound="DataclassConfig")


class DataclassConfig:
    """Mixin for ``@dataclass`` config classes; ``group`` names the config group in error messages."""

    group: ClassVar[str] = "config"

    @classmethod
    def from_mapping(cls: Type[T], cfg: Optional[Mapping[str, Any]]) -> T:
        """Build from a dict or DictConfig, naming unknown keys and the valid ones in the error."""
        cfg = dict(cfg or {})
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ValueError(f"unknown {cls.group} option(s) {unknown}; valid keys are {sorted(known)}")
        return cls(**cfg)

    def to_dict(self) -> dict:
        return asdict(self)  # type: ignore[call-overload]


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
