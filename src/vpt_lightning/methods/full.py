"""Full fine-tuning: every backbone weight trains, with a linear head (the paper's lower lr grid)."""

from timm.utils.model import unfreeze

from ..backbones.base import PromptedBackbone
from .base import TuningConfig, TuningMethod
from .registry import register_method


@register_method
class Full(TuningMethod):
    name = "full"
    prompts = "none"
    trains_backbone = True
    lr_grid = "base_lr_tuned_backbone"
    wd_grid = "weight_decay_tuned_backbone"
    optimizer = "adamw"  # the paper trains backbone weights with AdamW (spec extensions §5/§8)
    paper_method = "full"

    @classmethod
    def apply(cls, backbone: PromptedBackbone, config: TuningConfig) -> None:
        unfreeze(backbone.model)  # timm's helper: also gives BatchNorm its statistics back
