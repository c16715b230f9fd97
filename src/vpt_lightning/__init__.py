"""Visual Prompt Tuning (Jia et al., ECCV 2022) for timm vision transformers, with Lightning and Hydra.

Public API::

    from vpt_lightning import VPTModule, PromptedViT, PromptConfig, BackboneConfig, OptimConfig
"""

from .backbone import BackboneConfig, create_backbone, load_backbone_weights
from .module import OptimConfig, VPTModule
from .prompt import PromptConfig, Prompts
from .prompted_vit import PromptedViT

__version__ = "0.1.0"

__all__ = [
    "BackboneConfig",
    "OptimConfig",
    "PromptConfig",
    "PromptedViT",
    "Prompts",
    "VPTModule",
    "create_backbone",
    "load_backbone_weights",
]
