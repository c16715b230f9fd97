"""Which classifier heads a task package may name: the tuning methods' own heads, and heads that the user's code
registers (``@register_head``).

A package's ``config.json`` says how to rebuild its head, never by importing a module or class that the file names:

- ``{"source": "method"}``: the tuning method's head (linear; the MLP of ``tuning=mlp``), built from the package's
  ``tuning`` options;
- ``{"source": "registry", "name": NAME, "options": {...}}``: the head registered as ``NAME`` in this process.
  Registration is done by the user's own code (the module that defines the head, e.g. ``examples/custom_head.py``),
  which the operator imports (``vpt-serve --import examples/custom_head.py``, ``import my_heads`` in Python) before
  loading the package. A name that no imported module registered is refused, listing the registered names.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Type, TypeVar

import torch
from torch import nn

H = TypeVar("H", bound=type)

_HEADS: Dict[str, type] = {}


def register_head(name: str) -> Callable[[H], H]:
    """Class decorator: let task packages name this head class as ``name`` (e.g. ``"my_project.cosine"``).

    The class is built as ``cls(in_features, num_classes, **options)``; ``options`` are what its instance's
    ``head_options()`` returns (a JSON-able dict; default: none), saved in the package's ``config.json``.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_head needs a non-empty name, got {name!r}")

    def register(cls: H) -> H:
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise TypeError(f"register_head({name!r}) decorates an nn.Module class, got {cls!r}")
        known = _HEADS.get(name)
        if known is not None and known.__qualname__ != cls.__qualname__:
            raise ValueError(f"head name {name!r} is already registered for {known.__module__}.{known.__qualname__}")
        _HEADS[name] = cls  # the same class imported again (e.g. as __main__ and as a module) replaces itself
        return cls

    return register


def registered_heads() -> List[str]:
    """The head names registered in this process."""
    return sorted(_HEADS)


def registered_name(head: nn.Module) -> Optional[str]:
    """The name ``head``'s class was registered under, if any."""
    for name, cls in _HEADS.items():
        if type(head) is cls:
            return name
    return None


def describe_head(
    head: nn.Module, method: Any, tuning: Any, in_features: int, num_classes: int
) -> Optional[Dict[str, Any]]:
    """The ``head`` entry of a package's config for ``head``, or ``None`` when it cannot be rebuilt by name (neither a
    registered class nor the tuning method's head: e.g. SETR-PUP or a head whose class was never registered)."""
    name = registered_name(head)
    if name is not None:
        options = head.head_options() if hasattr(head, "head_options") else {}
        return {"source": "registry", "name": name, "options": dict(options)}
    # the method's head for comparison only: on the meta device and outside the global RNG, so describing a head
    # never changes what is trained after it
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        default = method.build_head(in_features, num_classes, tuning)
    same = type(default) is type(head) and {k: tuple(v.shape) for k, v in default.state_dict().items()} == {
        k: tuple(v.shape) for k, v in head.state_dict().items()
    }
    return {"source": "method"} if same else None


def build_head(
    spec: Optional[Mapping[str, Any]],
    method: Any,
    tuning: Any,
    in_features: int,
    num_classes: int,
    origin: str = "the task",
) -> nn.Module:
    """Rebuild a head from its config entry (``None``: the method's head, as older checkpoints imply)."""
    spec = dict(spec or {"source": "method"})
    source = spec.get("source")
    if source == "method":
        return method.build_head(in_features, num_classes, tuning)
    if source == "registry":
        name = spec.get("name")
        cls = _HEADS.get(name) if isinstance(name, str) else None
        if cls is None:
            raise ValueError(
                f"{origin} needs the head {name!r}, which is not registered in this process (registered: "
                f"{registered_heads() or 'none'}); import the module that defines and registers it first "
                "(vpt-predict/vpt-serve --import FILE_OR_MODULE, or `import` it in Python)"
            )
        options = spec.get("options") or {}
        if not isinstance(options, Mapping):
            raise ValueError(f"{origin}: head options must be a mapping, got {options!r}")
        return cls(in_features, num_classes, **options)
    raise ValueError(f"{origin}: head source {source!r} is not one of ['method', 'registry']")


def import_user_code(target: str) -> None:
    """Import the operator's own module that registers heads: a ``.py`` file path or a dotted module name.

    A file is imported under its own name with its folder put on ``sys.path`` (so worker processes, which
    re-import the classes of the model they receive, find it too); another module of that name is refused.
    """
    path = Path(target).expanduser()
    if target.endswith(".py") or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"--import {target!r}: no such file")
        path = path.resolve()
        if str(path.parent) not in sys.path:
            sys.path.insert(0, str(path.parent))
        try:
            module = importlib.import_module(path.stem)
        except ImportError as err:
            raise ValueError(f"--import {target!r} could not be imported: {err}") from err
        found = Path(getattr(module, "__file__", "") or "").resolve()
        if found != path:
            raise ValueError(
                f"--import {target!r}: the module name {path.stem!r} is already taken by {str(found)!r}; "
                "rename the file"
            )
        return
    try:
        importlib.import_module(target)
    except ImportError as err:
        raise ValueError(f"--import {target!r} could not be imported as a module: {err}") from err


def head_class(name: str) -> Type[nn.Module]:
    """The class registered as ``name``."""
    if name not in _HEADS:
        raise ValueError(f"head {name!r} is not registered (registered: {registered_heads() or 'none'})")
    return _HEADS[name]
