"""Visual Prompt Tuning (Jia et al., ECCV 2022) for timm backbones, with Lightning and Hydra.

Public API::

    from vpt_lightning import VPTModule, PromptedViT, PromptConfig, BackboneConfig, OptimConfig
    from vpt_lightning.backbones import prompted_backbone      # any registered timm family
    from vpt_lightning.methods import get_method               # tuning methods by name
    from vpt_lightning.sharing.checkpoint import read_task_checkpoint  # task checkpoints without Lightning
    from vpt_lightning import TaskModel, load_task, register_head  # task packages: save/load/push, custom heads
"""

import lazy_loader

from .renamed import install_moved_modules

# the public API (listed in __init__.pyi) is imported when first used: ``from vpt_lightning import VPTModule`` imports
# Lightning, ``vpt-serve`` and ``load_task`` never do
__getattr__, __dir__, __all__ = lazy_loader.attach_stub(__name__, __file__)

__version__ = "0.1.0"

install_moved_modules()  # the modules that moved into runs/, protocol/, sharing/ keep their old paths one release
