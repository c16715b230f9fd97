"""Visual Prompt Tuning (Jia et al., ECCV 2022) for timm backbones, with Lightning and Hydra.

Public API::

    from vpt_lightning import VPTModule, PromptedViT, PromptConfig, BackboneConfig, OptimConfig
    from vpt_lightning.backbones import prompted_backbone      # any registered timm family
    from vpt_lightning.methods import get_method               # tuning methods by name
    from vpt_lightning.sharing.checkpoint import read_task_checkpoint  # task checkpoints without Lightning
    from vpt_lightning import TaskModel, load_task, register_head  # task packages: save/load/push, custom heads
"""

from .backbones import (
    BackboneConfig,
    PromptedBackbone,
    PromptedViT,
    create_backbone,
    load_backbone_weights,
    prompted_backbone,
)
from .heads import register_head
from .module import VPTModule
from .optim import OptimConfig
from .prompt import PromptConfig, Prompts
from .renamed import install_moved_modules
from .sharing.task_sources import load_task
from .task_model import TaskModel

__version__ = "0.1.0"

install_moved_modules()  # the modules that moved into runs/, protocol/, sharing/ keep their old paths one release

__all__ = [
    "BackboneConfig",
    "OptimConfig",
    "PromptConfig",
    "PromptedBackbone",
    "PromptedViT",
    "Prompts",
    "TaskModel",
    "VPTModule",
    "create_backbone",
    "load_backbone_weights",
    "load_task",
    "prompted_backbone",
    "register_head",
]
