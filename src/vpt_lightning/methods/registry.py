"""The registry of tuning methods (a leaf: method modules import it), and parsing the ``tuning`` config node."""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Tuple, Type, TypeVar

from ..dataclass_config import plain_mapping
from .base import TuningConfig, TuningMethod

M = TypeVar("M", bound=Type[TuningMethod])

_METHODS: Dict[str, Type[TuningMethod]] = {}


def register_method(method: M) -> M:
    """Class decorator: make ``method`` available as ``tuning.method=<method.name>``."""
    if method.name in _METHODS and _METHODS[method.name] is not method:
        raise ValueError(f"tuning method {method.name!r} is registered twice")
    _METHODS[method.name] = method
    return method


def method_names() -> List[str]:
    return sorted(_METHODS)


def methods_in_report_order() -> List[str]:
    """The registered method names in the order of ``vpt-report``'s columns (:attr:`TuningMethod.report_order`)."""
    return sorted(_METHODS, key=lambda name: (_METHODS[name].report_order, name))


def get_method(name: str) -> Type[TuningMethod]:
    """The method registered as ``name``; a ``ValueError`` lists the valid names."""
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(f"tuning.method={name!r} is not one of {method_names()}") from None


def parse_tuning(config: Mapping[str, Any] | TuningConfig | None) -> Tuple[Type[TuningMethod], TuningConfig]:
    """The method and its validated config from a ``tuning`` mapping.

    ``method`` names the method; without it, a ``name`` that is a method's name names it (``{"name": "full"}``),
    else the method is ``vpt_deep``.
    """
    if isinstance(config, TuningConfig):
        method = get_method(config.method)
        if type(config) is method.Config:
            if config.name is None:
                config.name = method.label(config)
            return method, config
    values = plain_mapping(config)  # a mapping, or another method's config (tuning.method changed on the command line)
    if "method" not in values:
        values["method"] = values["name"] if values.get("name") in _METHODS else TuningConfig.method
    method = get_method(values["method"])
    parsed = method.Config.from_mapping(values)
    if parsed.name is None:
        parsed.name = method.label(parsed)
    return method, parsed
