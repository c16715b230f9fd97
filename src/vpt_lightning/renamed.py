"""Old names of renamed public objects, still importable for a while with a ``DeprecationWarning``."""

from __future__ import annotations

import warnings
from typing import Any, Callable, Mapping


def renamed_names(module: str, old_to_new: Mapping[str, Any]) -> Callable[[str], Any]:
    """A module-level ``__getattr__`` for ``module`` that serves each old name of ``old_to_new`` as its new object."""

    def __getattr__(name: str) -> Any:
        if name in old_to_new:
            new = old_to_new[name]
            warnings.warn(
                f"{module}.{name} is now {module}.{new.__name__}; the old name will be removed",
                DeprecationWarning,
                stacklevel=2,
            )
            return new
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__
