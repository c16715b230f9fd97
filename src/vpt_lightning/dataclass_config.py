"""A small base for the dataclasses behind the config groups: build from a mapping, dump to a dict, and the one
coercion of "a config dataclass, a DictConfig or a mapping" (:func:`plain_mapping`, :meth:`DataclassConfig.parse`)."""

from __future__ import annotations

import difflib
import math
from dataclasses import asdict, fields, is_dataclass
from typing import Any, Callable, ClassVar, Collection, Dict, Iterable, Mapping, Optional, Type, TypeVar, Union

from omegaconf import OmegaConf

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
    def parse(cls: Type[T], config: Any) -> T:
        """``config`` as this dataclass: taken as it is when it already is one, converted when it is a DictConfig
        typed by this schema (``conf/train.yaml``, :mod:`vpt_lightning.schemas`), else built from its mapping with
        :meth:`from_mapping` (``None``: the defaults)."""
        if isinstance(config, cls):
            return config
        if OmegaConf.is_config(config):
            node_type = OmegaConf.get_type(config)
            if isinstance(node_type, type) and issubclass(node_type, cls):
                # a key added with '+' (e.g. +prompt.num_token=5) joins the typed node, but to_object would drop it
                node_type.refuse_unknown_keys(config.keys())
                return OmegaConf.to_object(config)  # type: ignore[return-value]
        return cls.from_mapping(plain_mapping(config))

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


def plain_mapping(config: Any) -> Dict[str, Any]:
    """A plain ``dict`` of a config dataclass (its ``to_dict``), any other dataclass instance, a DictConfig
    (interpolations resolved) or a mapping; ``None`` gives ``{}``."""
    if config is None:
        return {}
    if isinstance(config, DataclassConfig):
        return config.to_dict()
    if is_dataclass(config) and not isinstance(config, type):
        return asdict(config)
    if OmegaConf.is_config(config):
        return OmegaConf.to_container(config, resolve=True)  # type: ignore[return-value]
    if isinstance(config, Mapping):
        return dict(config)
    raise TypeError(f"expected a config dataclass or a mapping, got {type(config).__name__}: {config!r}")


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
