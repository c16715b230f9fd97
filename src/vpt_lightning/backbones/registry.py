"""The registry of prompted-backbone families, keyed by the timm model class (a leaf: families import it)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Dict, List, Type, TypeVar

from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from .base import PromptedBackbone

F = TypeVar("F", bound=type)

_FAMILIES: Dict[type, type] = {}


def register_family(*model_classes: type) -> Callable[[F], F]:
    """Class decorator: ``@register_family(VisionTransformer)`` makes a family wrap those timm classes (and their
    subclasses)."""

    def register(family: F) -> F:
        for cls in model_classes:
            if cls in _FAMILIES and _FAMILIES[cls] is not family:
                raise ValueError(f"{cls.__name__} already has the family {_FAMILIES[cls].__name__}")
            _FAMILIES[cls] = family
        return family

    return register


def supported_classes() -> List[str]:
    """Names of the timm model classes that have a family."""
    return sorted(cls.__name__ for cls in _FAMILIES)


def classes_of(family: type) -> List[type]:
    """The timm model classes registered for ``family``."""
    return [cls for cls, registered in _FAMILIES.items() if registered is family]


def family_class_of_model(model: nn.Module) -> Type["PromptedBackbone"]:
    """The family class (a :class:`PromptedBackbone` subclass) of a built timm model: the one registered for its
    class or nearest registered base class."""
    for cls in type(model).__mro__:
        if cls in _FAMILIES:
            return _FAMILIES[cls]
    raise TypeError(
        f"no prompted-backbone family for the timm model class {type(model).__name__}; supported classes: "
        f"{supported_classes()} (add a module under vpt_lightning/backbones/ with @register_family)"
    )
