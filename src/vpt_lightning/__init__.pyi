# The public API of the package root, imported on first use: lazy_loader reads this stub ("X as X" marks a
# re-export), type checkers and the docs read it too. A process that only serves or predicts never imports Lightning.
from .backbones import BackboneConfig as BackboneConfig
from .backbones import PromptedBackbone as PromptedBackbone
from .backbones import PromptedViT as PromptedViT
from .backbones import create_backbone as create_backbone
from .backbones import load_backbone_weights as load_backbone_weights
from .backbones import prompted_backbone as prompted_backbone
from .heads import register_head as register_head
from .module import VPTModule as VPTModule
from .optim import OptimConfig as OptimConfig
from .prompt import PromptConfig as PromptConfig
from .prompt import Prompts as Prompts
from .sharing.task_sources import load_task as load_task
from .task_model import TaskModel as TaskModel

__version__: str
