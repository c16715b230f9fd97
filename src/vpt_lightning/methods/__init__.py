"""Tuning methods: one module per method, each registered under its ``tuning.method`` name.

Every module of this package is imported here, so a new method is one new module (with ``@register_method``)
plus ``conf/tuning/<name>.yaml``.
"""

import importlib
import pkgutil

from .base import TuningConfig, TuningMethod
from .registry import get_method, method_names, methods_in_report_order, parse_tuning, register_method

for _module in pkgutil.iter_modules(__path__):
    if _module.name not in ("base", "registry"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "TuningConfig",
    "TuningMethod",
    "get_method",
    "method_names",
    "methods_in_report_order",
    "parse_tuning",
    "register_method",
]
