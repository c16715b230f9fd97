"""Prompted backbone families: one module per timm model family, chosen by the timm model's class.

Every module of this package is imported here, so a new family is one new module (a
:class:`~vpt_lightning.backbones.base.PromptedBackbone` subclass with ``@register_family(TimmClass)``).
"""

import importlib
import pkgutil
from typing import Any, Mapping, Union

from torch import nn

from ..prompt import PromptConfig
from ..renamed import renamed_names
from .base import PromptedBackbone
from .registry import family_class_of_model, register_family, supported_classes

# the modules that are not families: the shared base and registry, weight loading and pinning, and the quickstart
# backbone's pretraining script (which needs Lightning's data: a process that only serves must not import it)
NOT_FAMILIES = ("base", "registry", "loading", "identity", "pin", "quickstart")
for _module in pkgutil.iter_modules(__path__):
    if _module.name not in NOT_FAMILIES:
        importlib.import_module(f"{__name__}.{_module.name}")

from .loading import BackboneConfig, create_backbone, load_backbone_weights  # noqa: E402
from .vit import PromptedViT  # noqa: E402


def prompted_backbone(
    model: nn.Module,
    prompt: Union[PromptConfig, Mapping[str, Any], None] = None,
    freeze_backbone: bool = True,
    backbone_eval: bool = True,
) -> PromptedBackbone:
    """Wrap a timm model in its family's prompted backbone (frozen, prompts per ``prompt``)."""
    return family_class_of_model(model)(model, prompt, freeze_backbone=freeze_backbone, backbone_eval=backbone_eval)


__getattr__ = renamed_names(__name__, {"family_for": family_class_of_model})

__all__ = [
    "BackboneConfig",
    "PromptedBackbone",
    "PromptedViT",
    "create_backbone",
    "family_class_of_model",
    "load_backbone_weights",
    "prompted_backbone",
    "register_family",
    "supported_classes",
]
