"""BitFit: every bias of the backbone trains, with a linear head."""

from ..backbones.base import PromptedBackbone
from .base import FineTuningMethod, TuningConfig
from .registry import register_method


@register_method
class Bias(FineTuningMethod):
    name = "bias"
    report_order = 21
    prompts = "none"

    @classmethod
    def apply(cls, backbone: PromptedBackbone, config: TuningConfig) -> None:
        for name, param in backbone.model.named_parameters():
            param.requires_grad_(name.endswith("bias"))
