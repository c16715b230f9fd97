"""A small base for the dataclasses behind the config groups: build from a mapping, dump to a dict."""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import Any, ClassVar, Mapping, Optional, Type, TypeVar

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
