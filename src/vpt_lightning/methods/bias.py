"""BitFit: every bias of the backbone trains, with a linear head."""

from ..backbones.base import PromptedBackbone
from .base import TuningConfig, TuningMethod
from .registry import register_method


@register_method
class Bias(TuningMethod):
    name = "bias"
    prompts = "none"
    trains_backbone = True
    lr_grid = "base_lr_tuned_backbone"
    wd_grid = "weight_decay_tuned_backbone"
    optimizer = "adamw"  # the paper trains backbone weights with AdamW (spec extensions §5/§8)

    @classmethod
    def apply(cls, backbone: PromptedBackbone, config: TuningConfig) -> None:
        for name, param in backbone.model.named_parameters():
            param.requires_grad_(name.endswith("bias"))
