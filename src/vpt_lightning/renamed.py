"""Old names of renamed or moved public objects and modules, still importable for one release with a
``DeprecationWarning``."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings
from types import ModuleType
from typing import Any, Callable, Mapping, Optional, Sequence

# The modules that left the package root for the concept subpackages (issue 28): old dotted name -> new one.
MOVED_MODULES = {
    f"vpt_lightning.{old}": f"vpt_lightning.{new}"
    for old, new in {
        "atomic": "runs.atomic",
        "locking": "runs.locking",
        "integrity": "runs.integrity",
        "nonfinite": "runs.nonfinite",
        "resume": "runs.resume",
        "run_folder": "runs.run_folder",
        "tracking": "runs.tracking",
        "training": "runs.training",
        "feature_cache": "runs.feature_cache",
        "threads": "runs.threads",
        "search": "protocol.search",
        "report": "protocol.report",
        "paper": "protocol.paper",
        "viz": "protocol.viz",
        "task_sources": "sharing.task_sources",
        "model_card": "sharing.model_card",
        "onnx_export": "sharing.onnx_export",
        "trust": "sharing.trust",
        "regular_files": "sharing.regular_files",
        "csv_files": "sharing.csv_files",
        "checkpoint": "sharing.checkpoint",
        "quickstart": "backbones.quickstart",
    }.items()
}


def _asked_by_from_import() -> bool:
    """Whether the module ``__getattr__`` calling this was called by importlib for ``from module import name``,
    which asks whether the name exists before it takes it: the warning is given once, at the take, where it names
    the user's line."""
    return sys._getframe(2).f_code.co_name == "_handle_fromlist"


def renamed_names(module: str, old_to_new: Mapping[str, Any]) -> Callable[[str], Any]:
    """A module-level ``__getattr__`` for ``module`` that serves each old name of ``old_to_new`` as its new object."""

    def __getattr__(name: str) -> Any:
        if name in old_to_new:
            new = old_to_new[name]
            if _asked_by_from_import():
                return new
            warnings.warn(
                f"{module}.{name} is now {module}.{new.__name__}; the old name will be removed",
                DeprecationWarning,
                stacklevel=2,
            )
            return new
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__


def moved_names(package: str, module: str) -> Callable[[str], Any]:
    """A package-level ``__getattr__`` for ``package``, once a module of the same name: its old names are served
    from ``module`` (where they now live) with a ``DeprecationWarning``."""

    def __getattr__(name: str) -> Any:
        target = importlib.import_module(module)
        if name.startswith("__") or not hasattr(target, name):
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        if _asked_by_from_import():
            return getattr(target, name)
        warnings.warn(
            f"{package}.{name} is now {module}.{name}; the old path will be removed",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(target, name)

    return __getattr__


class _MovedModule(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports an old module path as the module at its new place (the same module object), with a warning."""

    def __init__(self, moved: Mapping[str, str]) -> None:
        self.moved = moved

    def find_spec(
        self, fullname: str, path: Optional[Sequence[str]], target: Optional[ModuleType] = None
    ) -> Optional[importlib.machinery.ModuleSpec]:
        if fullname not in self.moved:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        new = self.moved[spec.name]
        warnings.warn(
            f"{spec.name} is now {new}; the old module path will be removed", DeprecationWarning, stacklevel=2
        )
        return importlib.import_module(new)

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run: the module at the new place is loaded already."""


def install_moved_modules() -> None:
    """Make the old paths of :data:`MOVED_MODULES` importable (once per interpreter)."""
    if not any(isinstance(finder, _MovedModule) for finder in sys.meta_path):
        sys.meta_path.append(_MovedModule(MOVED_MODULES))
