"""Full fine-tuning: every backbone weight trains, with a linear head (the paper's lower lr grid)."""

from timm.utils.model import unfreeze

from ..backbones.base import PromptedBackbone
from .base import FineTuningMethod, TuningConfig
from .registry import register_method


@register_method
class Full(FineTuningMethod):
    name = "full"
    report_order = 0
    prompts = "none"
    paper_method = "full"

    @classmethod
    def apply(cls, backbone: PromptedBackbone, config: TuningConfig) -> None:
        unfreeze(backbone.model)  # timm's helper: also gives BatchNorm its statistics back
